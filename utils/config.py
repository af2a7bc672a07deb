"""Experiment configuration: every default in one place, one YAML per experiment, `KEY VALUE` overrides.

Defaults are the faithful HRT-B / CATNet-protocol recipe of the official code (docs/MPC_SPEC.md Appendix A); a YAML file
changes what differs for its experiment, and command-line pairs such as `SOLVER.LR 5e-5` change the rest.
"""
from __future__ import annotations

import os

from fvcore.common.config import CfgNode

from utils.errors import UserError
from utils.files import atomic_write_text


class ConfigError(UserError, ValueError):
    """A config file, override or value that cannot be used; the message names the file or key."""


# The config layout's version, stored in every saved config (detectron2's VERSION). When a key is renamed, bump it
# and list the rename under the new version in CONFIG_RENAMES, so that configs stored in older checkpoints still load.
CONFIG_VERSION = 2
# version -> ((old key, new key or None when the key was removed), ...) made in that version
CONFIG_RENAMES: dict[int, tuple[tuple[str, str | None], ...]] = {
    2: (("TEST.THRESHOLD", None),),  # never read: the protocol's threshold is fixed (> 127 on 0-255, prediction.py)
}

_C = CfgNode()
_C.VERSION = CONFIG_VERSION
_C.STAGE = 1  # 1 = contrastive pre-training of the backbone, 2 = localization head

_C.MODEL = CfgNode()
_C.MODEL.BACKBONE = "hrt_base"  # hrt_base | hrt_small | hrt_tiny | hrt_nano | hrnet_w18 | hrnet_w32 | hrnet_w48
_C.MODEL.DROP_PATH_RATE = 0.2  # stochastic depth: what makes the two stage-1 views differ
_C.MODEL.HEAD = "catnet"  # catnet | casiav2 (stage 2)
_C.MODEL.IMAGENET_WEIGHTS = ""  # stage 1: HRFormer/HRNet ImageNet file to start from ("" = from scratch)
_C.MODEL.STAGE1_WEIGHTS = ""  # stage 2: the stage-1 checkpoint whose backbone is loaded (required)

_C.DATA = CfgNode()
_C.DATA.INPUT_SIZE = 512
_C.DATA.GT_RATIO = 4  # training masks at 1/4 of the input, the model's output stride
# Training mixture: [file list, repeat factor] pairs. The official CATNet protocol (docs/MPC_SPEC.md §5):
_C.DATA.TRAIN_LISTS = [
    ["flist/tampCOCO_sp_199999.npy", 1],
    ["flist/tampCOCO_cm_199429.npy", 1],
    ["flist/tampCOCO_bcm_199443.npy", 1],
    ["flist/CASIA2_5123.npy", 40],
    ["flist/IMD_2010.npy", 20],
]
# Validation: a seeded held-out split of the training lists' unique images (clean, docs/MPC_SPEC.md §9.8). Naming lists
# here (the official code uses flist/CASIAv1_920.npy and flist/DSO_100.npy, both test sets) replaces the split.
_C.DATA.VAL_LISTS = []
_C.DATA.VAL_HOLDOUT = 1000
_C.DATA.VAL_SEED = 0  # the split stays the same across runs and stages whatever RUNTIME.SEED is
_C.DATA.TEST_LISTS = [
    "flist/Columbia_160.npy", "flist/DSO_100.npy", "flist/CASIAv1_920.npy", "flist/NIST_564.npy",
    "flist/Coverage_100.npy", "flist/Korus_220.npy", "flist/In_the_wild_201.npy", "flist/CoCoGlide_512.npy",
    "flist/MISD_227.npy", "flist/FFpp_1000.npy",
]
_C.DATA.AUGMENT = True
_C.DATA.NUM_WORKERS = 4
_C.DATA.SKIP_BAD = False  # skip and count unreadable training samples instead of stopping

_C.LOSS = CfgNode()
_C.LOSS.MAX_SAMPLES = 5000  # per class set, per image, per term
_C.LOSS.TEMPERATURE = 0.1
_C.LOSS.WITHIN_IMAGE = 1.0
_C.LOSS.CROSS_SCALE = 1.0
_C.LOSS.CROSS_MODALITY = 1.0
_C.LOSS.POSITIVES = "own"  # own (official code) | other (the paper's figure), docs/MPC_SPEC.md §9.4
_C.LOSS.SHARE_SAMPLES = False  # one sample per class set reused by every term (official: redrawn per term)
_C.LOSS.HEAD = "focal"  # stage 2: focal (official code, α 0.5 γ 2) | bce (the paper's text)

_C.SOLVER = CfgNode()
_C.SOLVER.BATCH_SIZE = 4  # per process
_C.SOLVER.LR = 1e-4
_C.SOLVER.WEIGHT_DECAY = 0.01
_C.SOLVER.MAX_STEPS = 200000  # finite by default; 0 with RUN_FOREVER = the official "stop by hand"
_C.SOLVER.RUN_FOREVER = False
_C.SOLVER.VAL_EVERY = 8436  # samples between validations (official: 1 % of the 843,991-sample epoch)
_C.SOLVER.SCHEDULER = "plateau"  # plateau (stage 1) | cosine (stage 2), both stepped once per validation
_C.SOLVER.PLATEAU_FACTOR = 0.5
_C.SOLVER.PLATEAU_PATIENCE = 3
_C.SOLVER.MIN_LR = 1e-8
_C.SOLVER.COSINE_T_MAX = 20  # validations
_C.SOLVER.MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run stops
_C.SOLVER.LOG_EVERY = 20  # steps between CSV / TensorBoard rows

_C.STAGE2 = CfgNode()
_C.STAGE2.FREEZE_BACKBONE = True  # eval mode, no gradients, forward under no_grad
_C.STAGE2.FAITHFUL_TRAIN_MODE = False  # official: backbone left in train mode (BN drifts, DropPath on), §9.3

_C.TEST = CfgNode()
_C.TEST.NUM_WORKERS = 2
# Images per forward pass in stage-2 validation (the same maps up to float rounding; faster on a GPU, not on the
# CPU). Stage 1 validates one image at a time: its k-means draws are seeded per image, as officially.
_C.TEST.BATCH_SIZE = 1

_C.RUNTIME = CfgNode()
_C.RUNTIME.SEED = 0
_C.RUNTIME.DEVICE = "auto"  # auto | cpu | cuda | cuda:N
_C.RUNTIME.AMP = "off"  # off | auto (bf16 where supported, else fp16 with a scaler) | bf16 | fp16; CUDA only
_C.RUNTIME.CHANNELS_LAST = False
_C.RUNTIME.COMPILE = False
_C.RUNTIME.SYNC_BN = False  # multi-GPU only
# Recompute activations in backward instead of keeping them (HRFormer backbones): off | block (every transformer
# block) | module (every high-resolution module). Same loss, gradients and BN statistics; less memory, more time.
_C.RUNTIME.ACTIVATION_CHECKPOINTING = "off"


def get_default_config() -> CfgNode:
    return _C.clone()


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CfgNode:
    """Defaults, then the YAML file (if any), then `KEY VALUE` overrides; frozen."""
    cfg = get_default_config()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist" +
                              (" (it is a folder)" if os.path.isdir(path) else ""))
        try:
            cfg.merge_from_file(path)
        except Exception as error:  # yaml syntax (with line and column), unknown keys, wrong value types
            raise ConfigError(f"config file '{path}': {_config_problem(error)}") from None
    if len(overrides) % 2:
        raise ConfigError(f"overrides come in KEY VALUE pairs; got an odd number: {list(overrides)}")
    try:
        cfg.merge_from_list(list(overrides))
    except Exception as error:
        raise ConfigError(f"command-line override: {_config_problem(error)}") from None
    check_config(cfg)
    cfg.freeze()
    return cfg


def _config_problem(error: Exception) -> str:
    text = " ".join(str(error).split()).strip("'\"")
    return text[:300] or type(error).__name__


# Values that must be positive for any run to make sense; choices are checked where they are used (the builders).
_POSITIVE = ("DATA.INPUT_SIZE", "DATA.GT_RATIO", "LOSS.MAX_SAMPLES", "LOSS.TEMPERATURE", "SOLVER.BATCH_SIZE",
             "SOLVER.LR", "SOLVER.VAL_EVERY", "SOLVER.MAX_BAD_STEPS", "SOLVER.LOG_EVERY", "SOLVER.COSINE_T_MAX",
             "TEST.BATCH_SIZE")
_NOT_NEGATIVE = ("MODEL.DROP_PATH_RATE", "DATA.NUM_WORKERS", "SOLVER.WEIGHT_DECAY", "SOLVER.MAX_STEPS",
                 "SOLVER.MIN_LR", "TEST.NUM_WORKERS", "LOSS.WITHIN_IMAGE", "LOSS.CROSS_SCALE", "LOSS.CROSS_MODALITY")


def _value(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_config(cfg: CfgNode) -> None:
    """Refuse values no run can use (a negative batch size, a zero temperature, ...), naming the key."""
    for key in _POSITIVE:
        if not _value(cfg, key) > 0:
            raise ConfigError(f"{key} must be positive, got {_value(cfg, key)!r}")
    for key in _NOT_NEGATIVE:
        if _value(cfg, key) < 0:
            raise ConfigError(f"{key} must not be negative, got {_value(cfg, key)!r}")
    if cfg.STAGE not in (1, 2):
        raise ConfigError(f"STAGE must be 1 or 2, got {cfg.STAGE!r}")
    if cfg.DATA.INPUT_SIZE % cfg.DATA.GT_RATIO:
        raise ConfigError(f"DATA.INPUT_SIZE {cfg.DATA.INPUT_SIZE} is not a multiple of DATA.GT_RATIO "
                          f"{cfg.DATA.GT_RATIO}")


def _rename_key(tree: dict, old: str, new: str | None) -> None:
    *old_parents, old_leaf = old.split(".")
    node = tree
    for part in old_parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    if old_leaf not in node:
        return
    value = node.pop(old_leaf)
    if new is None:
        return
    *new_parents, new_leaf = new.split(".")
    node = tree
    for part in new_parents:
        node = node.setdefault(part, {})
    node[new_leaf] = value


def config_from_text(text: str) -> CfgNode:
    """A stored config (the YAML saved beside a run or inside a checkpoint) on today's defaults, frozen: keys renamed
    since the version it was written with are renamed first. Configs written before VERSION existed are version 1.
    Raises ValueError for a config from a newer version or text that is not a config; KeyError for unknown keys."""
    try:
        stored = CfgNode.load_cfg(text)
    except Exception as error:  # yaml's errors carry the line and column
        raise ValueError(f"not a YAML config: {' '.join(str(error).split())}") from None
    if not isinstance(stored, dict):
        raise ValueError("not a YAML config (no KEY: value mapping)")
    version = int(stored.pop("VERSION", 1))
    if version > CONFIG_VERSION:
        raise ValueError(f"the config is version {version}, newer than this code's {CONFIG_VERSION}")
    for later in range(version + 1, CONFIG_VERSION + 1):
        for old, new in CONFIG_RENAMES.get(later, ()):
            _rename_key(stored, old, new)
    cfg = get_default_config()
    cfg.merge_from_other_cfg(CfgNode(stored))
    cfg.freeze()
    return cfg


def save_config(cfg: CfgNode, path: str) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, cfg.dump())
