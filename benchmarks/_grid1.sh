python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, cleansweep.session; print(torch.__version__, torch.cuda.is_available())" || exit 4
nproc
run() { name=$1; shift; timeout 540 python3 benchmarks/calibrate_demo.py --workdir /tmp/cal/$name --threads 2 "$@" > $OUT/$name.log 2>&1 & }
run rn-mmcl-f02 --objectives mmcl --fraction 0.02 --epochs 12 --clean-lrs
run rn-ssl-f02 --objectives mmcl+ssl --fraction 0.02 --epochs 12 --clean-lrs
run rn-mmcl-f01 --objectives mmcl --fraction 0.01 --epochs 12 --clean-lrs
run rn-ssl-f01 --objectives mmcl+ssl --fraction 0.01 --epochs 12 --clean-lrs
run rn-ssl-f04 --objectives mmcl+ssl --fraction 0.04 --epochs 12 --clean-lrs
run vit-mmcl-f02 --objectives mmcl --fraction 0.02 --epochs 12 --model tiny-vit --clean-lrs
run vit-ssl-f02 --objectives mmcl+ssl --fraction 0.02 --epochs 12 --model tiny-vit --clean-lrs
wait
for f in $OUT/*.log; do echo "== $f"; grep -E "step|data ready|Error|error" $f | tail -14; done
