#!/usr/bin/env bash
# The closing note's examples, no flag: writes runs/predict/examples.txt from a scratch folder.
#   bash runs/predict/examples.sh
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
py=python3
run() { echo "\$ $*"; "$@" 2>&1; rc=$?; [ $rc -eq 0 ] || echo "(exit status $rc)"; }
{
  echo "# The closing note's examples, no flag: the README's and docs/model.md's predict examples, then hand-made ones (bench/samples.py examples hand: a lone test digit at 200x200, a thick 7 drawn with numpy lines at 200x200, test digits 1-10 at 112x112, 11-15 filling 28x28, all black on white but those; and test digit 0 bold, filling half the image)"
  echo "# $($py -c "import sys; sys.path.insert(0, '$root/bench'); from common import cpu_model; print(cpu_model())"), $(nproc) cores; commit $(git -C "$root" rev-parse --short HEAD)"
  $py "$root/bench/samples.py" mnist samples > /dev/null
  echo "\$ python3 bench/samples.py mnist samples"
  run $py "$root/capsnet_predict.py" samples/composite_*.png samples/digit_*.png --out predicted.png | sed "s#$root/##"
  echo
  $py "$root/bench/samples.py" examples write samples > /dev/null
  $py "$root/bench/samples.py" mnist samples --n 1 > /dev/null
  echo "\$ python3 bench/samples.py examples write samples; python3 bench/samples.py mnist samples --n 1"
  run $py "$root/capsnet_predict.py" samples/digit100_8.png samples/photo_4.jpg samples/blank.png samples/missing.png samples/digit_0_4.png samples/composite_0_9_4.png --out predicted.png | sed "s#$root/##"
  echo
  $py "$root/bench/samples.py" examples hand hand > /dev/null
  echo "\$ python3 bench/samples.py examples hand hand"
  run $py "$root/capsnet_predict.py" hand/*.png | sed "s#$root/##"
  echo
  echo "# limits: two digits forced on a lone one; a bold digit whose ink fills half the image and most of its edge"
  run $py "$root/capsnet_predict.py" --digits 2 samples/digit_1_7.png | sed "s#$root/##"
  run $py "$root/capsnet_predict.py" --background white hand/bold_test0_7.png | sed "s#$root/##"
} > "$root/runs/predict/examples.txt.tmp" && mv "$root/runs/predict/examples.txt.tmp" "$root/runs/predict/examples.txt"
echo "wrote runs/predict/examples.txt"
