#!/usr/bin/env bash
# GPU throughput and mixed-precision check of the HRNet model on a machine whose Python
# has JAX (and PyTorch) but no TensorFlow: our layer graph through Keras 3 on JAX, and
# timm's hrnet_w18 in PyTorch as the reference anchor. Wheels for keras/namex/optree are
# expected in .whl/ (pip download ... keras namex optree).
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
MODEL=${MODEL:-w18}; BATCH=${BATCH:-256}
KERAS_BACKEND=${BACKEND:-jax} python3 benchmarks/model_throughput_keras3.py --model "$MODEL" --batch "$BATCH" \
  --precision ${PRECISIONS:-bf16 fp16 fp32} --iters "${ITERS:-20}" ${KERAS_FLAGS:-}
python3 - <<'PY'
import time, torch, timm
torch.backends.cudnn.benchmark = True
m = timm.create_model("hrnet_w18").cuda().to(memory_format=torch.channels_last)
x = torch.randn(256, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
y = torch.randint(0, 1000, (256,), device="cuda")
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(m(x), y)
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
for _ in range(5): step()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): step()
torch.cuda.synchronize(); train = 256 * 20 / (time.perf_counter() - t)
m.eval()
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    for _ in range(5): m(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): m(x)
    torch.cuda.synchronize(); infer = 256 * 20 / (time.perf_counter() - t)
print("timm hrnet_w18 (PyTorch eager, bf16 autocast, channels_last, batch 256): inference %.1f img/s  training %.1f img/s" % (infer, train))
PY
