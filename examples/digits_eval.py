"""Data, checkpoints and quality measures of the digits demo.

The demo trains a small class-conditional DiT (official architecture, ``lazypass.models.DiT``)
on scikit-learn's ``load_digits`` (1,797 handwritten 8x8 digits, values 0..16, scaled here to
[-1, 1]; one channel, patch 1, so 64 tokens) and a small CNN classifier on the same data. The
classifier's penultimate layer is the feature space of the Frechet distance (FD, the FID
recipe with a digits network instead of Inception) and its output gives the accuracy on the
requested labels.

Example:
    >>> from digits_eval import load_digit_images, frechet_distance
    >>> x, y = load_digit_images()
    >>> x.shape, float(x.min()), float(x.max())
    (torch.Size([1797, 1, 8, 8]), -1.0, 1.0)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lazypass.models import DiT

ASSETS = Path(__file__).resolve().parent / "assets"
DIT_PATH = ASSETS / "digits_dit.safetensors"
CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"

DIT_CONFIG = dict(
    input_size=8, patch_size=1, in_channels=1, hidden_size=64, depth=4, num_heads=4,
    mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=False,
)  # fmt: skip
NULL_CLASS = DIT_CONFIG["num_classes"]


# -- diffusers multistep solvers on the digits DiT -------------------------------------------
# DiT's linear beta schedule, eps prediction, order 2. UniPC is what a user picks instead of
# fewer DDIM steps (the strongest solver on the quality curve at 7 and 10 steps, "leading"
# spacing chosen there on separate noise), and lazy sampling runs over it as over DDIM.
SOLVERS = ("DPM++(2M)", "UniPC")


def make_solver(name: str, spacing: str = "leading"):
    """A fresh diffusers scheduler for the digits DiT: ``"DPM++(2M)"`` or ``"UniPC"``."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon", timestep_spacing=spacing, steps_offset=0, solver_order=2)  # fmt: skip
    if name == "DPM++(2M)":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **kw)
    if name == "UniPC":
        return UniPCMultistepScheduler(**kw)
    raise ValueError(f"unknown solver {name!r}; choose one of {SOLVERS}")


@torch.no_grad()
def solver_sample(model, noise: Tensor, steps: int, cond: Tensor, solver: str = "UniPC", spacing: str = "leading",
                  callback=None) -> Tensor:  # fmt: skip
    """Sample with a diffusers solver at CFG 1; ``callback(i, t, x)`` after each step (as ``ddim_sample``)."""
    sched = make_solver(solver, spacing)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps = model(x, t.expand(x.shape[0]).long(), cond)
        x = sched.step(eps, t, x).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x


# -- the flow-matching digits model (diffusers format) -----------------------------------
# A diffusers ``SD3Transformer2DModel`` trained with the rectified-flow loss by
# ``examples/train_digits.py --flow`` (see ``train_flow`` there for the decisions), laid out as a
# diffusers model folder so that ``SD3Transformer2DModel.from_pretrained(FLOW_DIR / "transformer")``
# also works offline. The label-embedding table stands in for the text encoder.
FLOW_DIR = ASSETS / "digits_flow"
FLOW_TRANSFORMER_DIR = FLOW_DIR / "transformer"
FLOW_CONFIG_PATH = FLOW_TRANSFORMER_DIR / "config.json"
FLOW_WEIGHTS_PATH = FLOW_TRANSFORMER_DIR / "diffusion_pytorch_model.safetensors"
FLOW_LABELS_PATH = FLOW_DIR / "label_embedding.safetensors"
FLOW_SCHEDULER_PATH = FLOW_DIR / "scheduler" / "scheduler_config.json"

FLOW_CONFIG = dict(
    sample_size=8, patch_size=1, in_channels=1, out_channels=1, num_layers=4,
    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
    caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=8,
)  # fmt: skip
FLOW_LABEL_TOKENS = 4  # "text" tokens per label
FLOW_SHIFT = 1.0  # FlowMatchEulerDiscreteScheduler(shift=...) the model is sampled with
FLOW_NUM_LABELS = 11  # digits 0-9 and the null label (NULL_CLASS) for classifier-free guidance


def gates_path(ratio: float, steps: int, solver: str = "DDIM") -> Path:
    """Where the main job's fitted gates live, e.g. ``digits_gates_50pct_20steps.safetensors``
    (gates fitted over another solver: ``digits_gates_unipc_30pct_10steps.safetensors``)."""
    tag = "" if solver == "DDIM" else solver_tag(solver).lower() + "_"
    return ASSETS / f"digits_gates_{tag}{round(ratio * 100)}pct_{steps}steps.safetensors"


def solver_tag(solver: str) -> str:
    """A solver's name as a file-name part: ``"DPM++(2M)"`` -> ``"DPMpp2M"``."""
    return solver.replace("+", "p").replace("(", "").replace(")", "")


def load_digit_images() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and their labels (N,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def split_indices(n: int, seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """A fixed train / test split of the digits (used by the classifier)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * test_fraction))
    return perm[k:], perm[:k]


class DigitClassifier(nn.Module):
    """Small CNN for 8x8 digits; ``features`` is the 64-d penultimate layer used for FD."""

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, 10)

    def features(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc1(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


def build_dit() -> DiT:
    return DiT(**DIT_CONFIG).eval()


def save_checkpoint(model: nn.Module, path: Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


def checkpoint_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def _missing(path: Path, script: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found; build it with `python examples/{script}`")


def load_dit(path: Path = DIT_PATH) -> DiT:
    """The trained digits DiT (eval mode). Its config is read from the checkpoint metadata."""
    if not path.exists():
        raise _missing(path, "train_digits.py")
    config = checkpoint_metadata(path).get("config", DIT_CONFIG)
    model = DiT(**config)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def to_diffusers_dit(model: DiT):
    """The same network as a diffusers ``DiTTransformer2DModel`` (eval mode), by a weight mapping.

    ``lazypass.models.DiT`` is the official DiT architecture, and diffusers' class is that too, so
    every tensor has a home (the mapping of diffusers' ``scripts/convert_dit_to_diffusers.py``):
    ``x_embedder.proj`` -> ``pos_embed.proj``; the timestep MLP and label table -> each block's
    ``norm1.emb`` (diffusers keeps a copy per block); ``blocks.i.adaLN_modulation.1`` ->
    ``norm1.linear`` (same chunk order: shift, scale, gate for attention, then for the MLP);
    the fused ``attn.qkv`` is split into ``to_q``/``to_k``/``to_v``; ``attn.proj`` ->
    ``attn1.to_out.0``; ``mlp.fc1``/``fc2`` -> ``ff.net.0.proj``/``ff.net.2``; the final layer's
    modulation and linear -> ``proj_out_1``/``proj_out_2``. LayerNorm eps is 1e-6 as in DiT.

    One difference is not a weight: diffusers' ``CombinedTimestepLabelEmbeddings`` builds its
    sinusoidal timestep features with ``downscale_freq_shift=1`` (frequencies ``10000^(-i/127)``),
    the official DiT with ``10000^(-i/128)``. At t=999 that moves the angles by up to 0.4 rad, so
    the converted model is set to the official frequencies (``time_proj.downscale_freq_shift = 0``
    in every block); the config cannot express it, so a model rebuilt ``from_config`` has to set it
    again. ``tests/test_peers.py`` checks the parity (max abs difference of the outputs).

    Example:
        >>> d = to_diffusers_dit(DiT(**DIT_CONFIG, init="random").eval())
        >>> type(d).__name__, d.config.num_layers
        ('DiTTransformer2DModel', 4)
    """
    from diffusers import DiTTransformer2DModel

    c = model.config
    heads, dim = c["num_heads"], c["hidden_size"]
    if c["mlp_ratio"] != 4.0:
        raise ValueError(f"DiTTransformer2DModel has an MLP ratio of 4, this DiT {c['mlp_ratio']}")
    out = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=c["in_channels"],
        out_channels=model.out_channels, num_layers=c["depth"], sample_size=c["input_size"],
        patch_size=c["patch_size"], num_embeds_ada_norm=c["num_classes"], norm_eps=1e-6,
    )  # fmt: skip
    src = model.state_dict()
    sd = {"pos_embed.proj.weight": src["x_embedder.proj.weight"], "pos_embed.proj.bias": src["x_embedder.proj.bias"]}
    for i in range(c["depth"]):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = o + "norm1.emb."
        for k, j in (("linear_1", 0), ("linear_2", 2)):
            for w in ("weight", "bias"):
                sd[f"{emb}timestep_embedder.{k}.{w}"] = src[f"t_embedder.mlp.{j}.{w}"]
        sd[emb + "class_embedder.embedding_table.weight"] = src["y_embedder.embedding_table.weight"]
        for w in ("weight", "bias"):
            sd[f"{o}norm1.linear.{w}"] = src[f"{b}adaLN_modulation.1.{w}"]
            for name, part in zip(("to_q", "to_k", "to_v"), src[f"{b}attn.qkv.{w}"].chunk(3)):
                sd[f"{o}attn1.{name}.{w}"] = part
            sd[f"{o}attn1.to_out.0.{w}"] = src[f"{b}attn.proj.{w}"]
            sd[f"{o}ff.net.0.proj.{w}"] = src[f"{b}mlp.fc1.{w}"]
            sd[f"{o}ff.net.2.{w}"] = src[f"{b}mlp.fc2.{w}"]
    for w in ("weight", "bias"):
        sd[f"proj_out_1.{w}"] = src[f"final_layer.adaLN_modulation.1.{w}"]
        sd[f"proj_out_2.{w}"] = src[f"final_layer.linear.{w}"]
    out.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    for block in out.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # the official DiT's frequencies
    return out.eval().requires_grad_(False)


def load_diffusers_dit(path: Path = DIT_PATH):
    """The trained digits DiT as a diffusers ``DiTTransformer2DModel`` (:func:`to_diffusers_dit`)."""
    return to_diffusers_dit(load_dit(path))


def diffusers_ddim(**overrides):
    """diffusers' ``DDIMScheduler`` configured as lazypass's own DDIM (``lazypass.sampling``): DiT's
    linear schedule (1e-4 to 0.02, 1,000 steps), "leading" spacing with offset 0, the last step to
    x0 (``set_alpha_to_one``), eta 0, epsilon prediction, no clipping."""
    from diffusers import DDIMScheduler

    config = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
                  prediction_type="epsilon")  # fmt: skip
    config.update(overrides)
    return DDIMScheduler(**config)


def load_classifier(path: Path = CLASSIFIER_PATH) -> DigitClassifier:
    if not path.exists():
        raise _missing(path, "train_digits.py --classifier")
    meta = checkpoint_metadata(path)
    model = DigitClassifier(meta.get("feature_dim", 64))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# -- measures ------------------------------------------------------------------------


@torch.no_grad()
def classifier_outputs(classifier: DigitClassifier, images: Tensor, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64) and predicted labels of images in [-1, 1] (clamped)."""
    feats, preds = [], []
    for chunk in images.clamp(-1, 1).split(batch):
        f = classifier.features(chunk)
        feats.append(f.double().numpy())
        preds.append(classifier.fc2(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray]) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between two Gaussians.

    The trace of the matrix square root is the sum of square roots of the eigenvalues of
    ``A^(1/2) S_b A^(1/2)`` with ``A = S_a`` (symmetric PSD, so no complex sqrtm is needed).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> a = gaussian_stats(rng.normal(size=(5000, 3)))
        >>> round(frechet_distance(a, a), 6)
        0.0
    """
    mu_a, s_a = stats_a
    mu_b, s_b = stats_b
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)


def psnr(images: Tensor, reference: Tensor) -> float:
    """Mean over samples of the PSNR (dB) against ``reference``, both in [-1, 1] (peak-to-peak 2)."""
    a, b = images.clamp(-1, 1).flatten(1), reference.clamp(-1, 1).flatten(1)
    mse = (a - b).pow(2).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


def accuracy(preds: np.ndarray, labels: Tensor) -> float:
    return float((preds == labels.numpy()).mean())


# -- flow-matching model: build, load, condition, sample -------------------------------------


class LabelEmbedding(nn.Module):
    """Stands in for SD3's text encoders: a label (0-9, or ``NULL_CLASS`` for "no label") becomes
    ``encoder_hidden_states`` (B, tokens, joint_attention_dim) and ``pooled_projections``
    (B, pooled_projection_dim), two learned tables trained with the transformer.

    ``label_embedding(labels)`` returns the transformer's conditioning keyword arguments.

    Example:
        >>> emb = LabelEmbedding(tokens=4, joint_attention_dim=32, pooled_projection_dim=16)
        >>> kw = emb(torch.tensor([3, 10]))
        >>> tuple(kw["encoder_hidden_states"].shape), tuple(kw["pooled_projections"].shape)
        ((2, 4, 32), (2, 16))
    """

    def __init__(self, num_labels: int = FLOW_NUM_LABELS, tokens: int = FLOW_LABEL_TOKENS,
                 joint_attention_dim: int = 32, pooled_projection_dim: int = 32) -> None:  # fmt: skip
        super().__init__()
        # unit-variance entries: what a (normalised) text encoder would hand over
        self.context = nn.Parameter(torch.randn(num_labels, tokens, joint_attention_dim))
        self.pooled = nn.Parameter(torch.randn(num_labels, pooled_projection_dim))

    def forward(self, labels: Tensor) -> dict[str, Tensor]:
        return dict(encoder_hidden_states=self.context[labels], pooled_projections=self.pooled[labels])


def build_flow_transformer(config: dict | None = None):
    """A fresh ``SD3Transformer2DModel`` from ``config`` (default ``FLOW_CONFIG``); downloads nothing."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_config(dict(config or FLOW_CONFIG))


def build_label_embedding(config: dict | None = None, tokens: int = FLOW_LABEL_TOKENS) -> LabelEmbedding:
    config = config or FLOW_CONFIG
    return LabelEmbedding(FLOW_NUM_LABELS, tokens, config["joint_attention_dim"], config["pooled_projection_dim"])


def flow_scheduler(shift: float | None = None, path: Path = FLOW_SCHEDULER_PATH):
    """The ``FlowMatchEulerDiscreteScheduler`` the flow model is sampled with (its committed
    config, else ``shift=FLOW_SHIFT``); ``shift`` overrides the config's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads(path.read_text()) if path.exists() else dict(num_train_timesteps=1000, shift=FLOW_SHIFT)
    if shift is not None:
        config["shift"] = shift
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def save_flow_model(transformer, label_embedding: LabelEmbedding, metadata: dict, directory: Path = FLOW_DIR,
                    shift: float = FLOW_SHIFT) -> None:  # fmt: skip
    """Diffusers layout under ``directory``: ``transformer/{config.json, diffusion_pytorch_model.safetensors}``,
    ``scheduler/scheduler_config.json`` and ``label_embedding.safetensors``. ``metadata`` (JSON
    values) goes into both safetensors files, next to ``format: pt`` as diffusers writes it."""
    (directory / "transformer").mkdir(parents=True, exist_ok=True)
    (directory / "scheduler").mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **{k: json.dumps(v) for k, v in metadata.items()}}
    (directory / "transformer" / "config.json").write_text(transformer.to_json_string())
    tensors = {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}
    save_file(tensors, str(directory / "transformer" / "diffusion_pytorch_model.safetensors"), metadata=meta)
    labels = {k: v.detach().contiguous() for k, v in label_embedding.state_dict().items()}
    save_file(labels, str(directory / "label_embedding.safetensors"), metadata=meta)
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    (directory / "scheduler" / "scheduler_config.json").write_text(sched.to_json_string())


def flow_metadata(directory: Path = FLOW_DIR) -> dict:
    """Training metadata of the flow model (seed, config, steps, training time and machine load)."""
    from safetensors import safe_open

    with safe_open(str(directory / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "format"}


def load_flow_dit(directory: Path = FLOW_DIR):
    """The trained flow-matching digits model: ``(transformer, label_embedding)``, both in eval mode.

    The transformer is built from its committed diffusers config (``from_config``) and its weights
    are read with safetensors; nothing is downloaded.

    Example:
        >>> transformer, label_embedding = load_flow_dit()
        >>> x = flow_sample(transformer, label_embedding, torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), 4)
        >>> tuple(x.shape)
        (2, 1, 8, 8)
    """
    config_path = directory / "transformer" / "config.json"
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    labels_path = directory / "label_embedding.safetensors"
    for path in (config_path, weights, labels_path):
        if not path.exists():
            raise _missing(path, "train_digits.py --flow")
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    transformer = build_flow_transformer(config)
    transformer.load_state_dict(load_file(str(weights)))
    table = load_file(str(labels_path))
    label_embedding = LabelEmbedding(*table["context"].shape, table["pooled"].shape[1])
    label_embedding.load_state_dict(table)
    return transformer.eval().requires_grad_(False), label_embedding.eval().requires_grad_(False)


def flow_cond(label_embedding: LabelEmbedding, labels: Tensor) -> dict[str, Tensor]:
    """Labels (B,) -> the transformer's conditioning: ``encoder_hidden_states``, ``pooled_projections``."""
    return label_embedding(labels)


@torch.no_grad()
def flow_sample(transformer, cond_fn, noise: Tensor, labels: Tensor, steps: int, guidance_scale: float = 1.0,
                scheduler=None, null_label: int = NULL_CLASS, callback=None) -> Tensor:  # fmt: skip
    """Euler sampling of a flow-matching model with diffusers' ``FlowMatchEulerDiscreteScheduler``.

    ``cond_fn(labels)`` returns the conditioning keyword arguments of ``transformer`` (e.g. the
    ``LabelEmbedding``). The model is called as ``StableDiffusion3Pipeline`` calls it:
    ``timestep = sigma * 1000`` expanded to the batch, velocity out. With ``guidance_scale != 1``
    the unconditional (``null_label``) and conditional halves run as one batch of 2B, uncond first,
    and are combined as ``v_u + g (v_c - v_u)``. ``scheduler`` defaults to ``flow_scheduler()``;
    ``set_timesteps`` is called on it (which resets its step index). ``callback(i, t, x)`` runs
    after each step.
    """
    scheduler = scheduler if scheduler is not None else flow_scheduler()
    scheduler.set_timesteps(steps, device=noise.device)
    guided = guidance_scale != 1.0
    cond = cond_fn(labels.to(noise.device))
    if guided:
        uncond = cond_fn(torch.full_like(labels, null_label).to(noise.device))
        cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        inp = torch.cat([x, x]) if guided else x
        v = transformer(inp, timestep=t.expand(inp.shape[0]), return_dict=False, **cond)[0]
        if guided:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        if callback is not None:
            callback(i, t, x)
    return x
