python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
run() { name=$1; shift; timeout 265 python3 benchmarks/calibrate_demo.py --workdir /tmp/cal/$name --threads 2 "$@" > $OUT/$name.log 2>&1 & }
run m-f02 --objectives mmcl --fraction 0.02 --epochs 10 --clean-lrs
run s-f02 --objectives mmcl+ssl --fraction 0.02 --epochs 8 --clean-lrs
run m-f01 --objectives mmcl --fraction 0.01 --epochs 10 --clean-lrs
run s-f01 --objectives mmcl+ssl --fraction 0.01 --epochs 8 --clean-lrs
run s-f03 --objectives mmcl+ssl --fraction 0.03 --epochs 8 --clean-lrs
run m-hard --objectives mmcl --fraction 0.02 --epochs 10 --knob caption_noise=0.3 --knob jitter=0.8 --clean-lrs
run c3 --objectives mmcl --fraction 0.02 --epochs 6 --clean-epochs 5 --clean-lrs 3e-3
run c1 --objectives mmcl --fraction 0.02 --epochs 6 --clean-epochs 5 --clean-lrs 1e-3
wait
for f in $OUT/*.log; do echo "== $f"; grep -E "step|data ready|Error" $f | sed 's/\[mmcl/[m/' | cut -c1-75 | tail -16; done
