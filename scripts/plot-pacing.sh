#!/bin/sh
# plot-pacing.sh: runs the demo's month of pacing (gateway_demo
# --pacing-only, examples/pacing_month.hpp) and draws docs/pacing.svg with
# gnuplot (Debian: gnuplot-nox; not needed by the build or the tests); an
# out path ending .png gets a PNG.
#
#   sh scripts/plot-pacing.sh [path/to/gateway_demo] [out.svg]
set -eu
demo=${1:-./build/release/examples/gateway_demo}
out=${2:-docs/pacing.svg}
command -v gnuplot >/dev/null || { echo "plot-pacing: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 2; }
case "$out" in
  *.png) term='pngcairo size 1000,420 font "sans,10"' ;;
  *) term='svg size 1000,420 dynamic font "sans,11"' ;;
esac
dat=$(mktemp)
trap 'rm -f "$dat"' EXIT
"$demo" --pacing-only | sed -n '/^# pacing-data begin/,/^# pacing-data end/p' >"$dat"
[ -s "$dat" ] || { echo "plot-pacing: no data block from $demo" >&2; exit 1; }
gnuplot <<GP
set terminal $term
set output "$out"
set multiplot layout 1,2 title "A \$100 monthly budget, demand 1.5x it (December 2026, bursty, weekly seasonality)"
set xlabel "day of December"
set xrange [0.5:31.5]
set grid
set key top left
set ylabel "USD spent that day"
set style fill solid 0.6
set boxwidth 0.4
plot "$dat" using (\$1-0.2):2 with boxes title "paced", \
     "$dat" using (\$1+0.2):3 with boxes title "unpaced"
set ylabel "USD spent since Dec 1"
set yrange [0:110]
set key bottom right
plot "$dat" using 1:4 with linespoints pt 7 ps 0.5 title "paced", \
     "$dat" using 1:5 with linespoints pt 7 ps 0.5 title "unpaced", \
     "$dat" using 1:6 with lines dt 2 title "even spend", \
     100 with lines lc rgb "black" title "budget"
unset multiplot
GP
echo "plot-pacing: wrote $out"
