"""One gate file of the digits DiT on the main job's noise: lazy ratio (MACs), FD and PSNR.

    PYTHONPATH=$PWD python benchmarks/digits_gates_eval.py examples/assets/digits_gates_50pct_20steps.safetensors 20
    PYTHONPATH=$PWD python benchmarks/digits_gates_eval.py examples/assets/digits_gates_30pct_10steps.safetensors 10

The lazy model takes the options saved with the gates; 1,000 seed-0 noises, labels 0-9 in turn,
DDIM, CFG 1, FD and PSNR as ``examples/digits.py`` computes them (PSNR against full compute at the
same step count). Prints the equivalent full-compute steps (MACs per image / MACs of one call) and
the share of samples skipping (site 0) per step.
"""
import sys, torch, numpy as np
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1] / 'examples'))
import lazypass
from digits_eval import *
from lazypass.checkpoint import read_gates
from lazypass.config import GATE_OPTIONS
from lazypass.sampling import ddim_sample
from lazypass.runtime import runtime
torch.set_num_threads(1)
path, steps = sys.argv[1], int(sys.argv[2]); n = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
clf = load_classifier(); real = gaussian_stats(classifier_outputs(clf, load_digit_images()[0])[0])
g = torch.Generator().manual_seed(0); noise = torch.randn(n, 1, 8, 8, generator=g); labels = torch.arange(n) % 10
saved = read_gates(path).config
m = lazypass.apply(load_dit(), **{k: saved[k] for k in GATE_OPTIONS})
m(torch.zeros(1,1,8,8), torch.zeros(1,dtype=torch.long), torch.zeros(1,dtype=torch.long))
lazypass.load_gates(m, path)
with lazypass.trajectory(m), torch.no_grad():
    img = ddim_sample(m, noise, steps, cond=labels, learned_sigma=False)
    sk = lazypass.stats(m).skipped
prog = runtime(m).program
site = np.array([s.macs for s in prog.sites], float)
ratio = (sk * site[None,:,None]).sum() / (site.sum() * sk.shape[0] * sk.shape[2])
plain = load_dit()
with torch.no_grad():
    full = ddim_sample(plain, noise, steps, cond=labels, learned_sigma=False)
fd = lambda x: frechet_distance(gaussian_stats(classifier_outputs(clf, x)[0]), real)
print(f"{path} steps {steps} thr {runtime(m).threshold:.4f} ratio(MACs) {ratio:.4f} eq {steps*(1-ratio*site.sum()/prog.model_macs):.2f} FD {fd(img):.2f} PSNR {psnr(img, full):.2f} FDfull {fd(full):.2f}")
print("per-step skip share:", " ".join(f"{v:.2f}" for v in sk.mean(2)[:, 0]))
