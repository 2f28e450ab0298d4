# gnuplot -e "dat='peers.dat'; png='peers.png'" peers.gp (from run.sh)
set terminal pngcairo size 1000,460 font ",10"
set output png
set title "ns per op, one run (lower is better; log scale)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set logscale y
set yrange [1:*]
set ylabel "ns per op"
set grid ytics
set key top left
set datafile missing "?"
plot dat using 2:xtic(1) title columnheader(2), \
     '' using 3 title columnheader(3), \
     '' using 4 title columnheader(4), \
     '' using 5 title columnheader(5)
