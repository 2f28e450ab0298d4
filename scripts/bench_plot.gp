# gnuplot -e "dir='build/bench'" scripts/bench_plot.gp -> dir/bench.png
set terminal pngcairo size 1100,420 font ",10"
set output dir.'/bench.png'
set multiplot layout 1,2 title "ratekeeper: ns per check (lower is better)"
set logscale x
set xlabel "distinct keys"
set ylabel "ns per check, one thread"
set key top left
set grid
plot dir.'/keys.dat' index 0 with linespoints title "ShardedStore", \
     dir.'/keys.dat' index 1 with linespoints title "InMemoryStore"
unset logscale x
set xlabel "threads"
set ylabel "wall ns per check, all threads together"
set xtics 1
names = system("cat ".dir."/threads.names")
plot for [i=0:words(names)/2-1] dir.'/threads.dat' index i with linespoints \
     title word(names, 2*i+1).' '.word(names, 2*i+2)
unset multiplot
