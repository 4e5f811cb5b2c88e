"""`finevit doctor`: what is installed, what finevit will use, and whether the install works.

Gathering facts (`gather()`) is kept apart from judging them (`find_problems()`), so every broken
install can be tested by feeding facts instead of breaking a virtual environment. Every import is
defensive: a broken optional package is reported, never a traceback.
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional, TextIO

SUPPORTED_MEGATRON = (0, 19)
MIN_PYTHON = (3, 12)
NOT_INSTALLED = "not installed"


@dataclass
class Package:
    version: Optional[str] = None  # None: not installed
    error: Optional[str] = None  # installed, but importing it failed (first line of the error)
    note: str = ""  # shown after the version, e.g. why an unrelated package does not count

    def describe(self) -> str:
        if self.version is None:
            text = NOT_INSTALLED
        elif self.error:
            text = f"{self.version}, but import fails: {self.error}"
        else:
            text = self.version
        return f"{text} ({self.note})" if self.note else text


@dataclass
class Facts:
    python: tuple  # sys.version_info[:3]
    packages: dict  # label -> Package, in report order
    executable: str = ""  # the interpreter, to tell which environment was checked
    cuda: Optional[str] = None  # CUDA version torch was built for; None for a CPU build
    devices: list = field(default_factory=list)  # names of visible CUDA devices
    nccl: Optional[bool] = None  # None: unknown (torch not importable)
    gloo: Optional[bool] = None
    use_te: Optional[bool] = None  # None: unknown (the model code does not import)
    layer_spec: str = "unknown"
    attention: str = "unknown"


# label, module to import, distribution name for the version. deepspeed, mosaicml-streaming and
# transformers are only located, not imported: importing them costs seconds and their one
# known failure (a torchvision that does not match torch) is caught by the torchvision check.
IMPORTED = [
    ("torch", "torch", "torch"),
    ("torchvision", "torchvision", "torchvision"),
    ("megatron-core", "megatron.core", "megatron-core"),
    # megatron.core.extensions.transformer_engine imports without TE (as mocks), so only
    # transformer_engine itself tells; without cuDNN it raises OSError.
    ("transformer-engine", "transformer_engine", "transformer-engine"),
    ("flash-attn", "flash_attn", "flash-attn"),
    ("sentencepiece", "sentencepiece", "sentencepiece"),
    ("psutil", "psutil", "psutil"),
]
LOCATED = [
    ("deepspeed", "deepspeed", "deepspeed"),
    ("mosaicml-streaming", "streaming", "mosaicml-streaming"),
    ("transformers", "transformers", "transformers"),
]
REPORT_ORDER = ["torch", "torchvision", "megatron-core", "transformer-engine", "apex", "flash-attn",
                "deepspeed", "mosaicml-streaming", "transformers", "sentencepiece", "psutil"]


def _dist_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _imported(module: str, dist: str) -> Package:
    version = _dist_version(dist)
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure to import is a fact to report
        if version is None and isinstance(e, ModuleNotFoundError) and e.name == module.split(".")[0]:
            return Package()
        return Package(version or "unknown version", _first_line(e))
    return Package(version or str(getattr(mod, "__version__", "unknown version")))


def _located(module: str, dist: str) -> Package:
    if importlib.util.find_spec(module) is None:
        return Package()
    return Package(_dist_version(dist) or "unknown version")


def _apex() -> Package:
    """NVIDIA apex, which is not the PyPI project that is also named apex."""
    version = _dist_version("apex")
    for module in ("apex.normalization", "amp_C"):
        try:
            importlib.import_module(module)
            return Package(version or "unknown version")
        except Exception:  # noqa: BLE001
            continue
    if version is not None:
        return Package(note=f"the installed 'apex' {version} is not NVIDIA apex")
    return Package()


def _torch_facts(facts: Facts) -> None:
    import torch

    facts.cuda = torch.version.cuda
    if torch.cuda.is_available():
        facts.devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    dist = torch.distributed
    facts.nccl = dist.is_available() and dist.is_nccl_available()
    facts.gloo = dist.is_available() and dist.is_gloo_available()


def _model_facts(facts: Facts) -> None:
    from finevit.models.vision.layer_spec import attention_backend, have_transformer_engine

    facts.use_te = have_transformer_engine()
    facts.attention = attention_backend(facts.use_te)
    facts.layer_spec = ("transformer-engine (fused norm + linear layers)" if facts.use_te else
                        "local (megatron tensor-parallel linears, finevit RMSNorm)")


def gather() -> Facts:
    # Imports of megatron and torch warn about every missing accelerator package; the report
    # states those facts once, so their warnings would only bury it.
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _gather()
    finally:
        cpp_log.setLevel(level)


def _gather() -> Facts:
    pkgs = {label: _imported(mod, dist) for label, mod, dist in IMPORTED}
    pkgs.update({label: _located(mod, dist) for label, mod, dist in LOCATED})
    pkgs["apex"] = _apex()
    facts = Facts(python=tuple(sys.version_info[:3]), packages={k: pkgs[k] for k in REPORT_ORDER},
                  executable=sys.executable)
    if pkgs["torch"].version and not pkgs["torch"].error:
        _torch_facts(facts)
        if pkgs["megatron-core"].version and not pkgs["megatron-core"].error:
            try:
                _model_facts(facts)
            except Exception as e:  # noqa: BLE001
                facts.layer_spec = f"unknown: finevit.models does not import ({_first_line(e)})"
    return facts


def _minor(version: str) -> Optional[tuple]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _version(v: tuple) -> str:
    return ".".join(str(x) for x in v)


def _core_problems(p: dict) -> list:
    out = []
    torch, mcore = p["torch"], p["megatron-core"]
    if torch.version is None:
        out.append("torch is not installed: run `make install`.")
    elif torch.error:
        out.append(f"torch {torch.version} is installed but cannot be imported ({torch.error}).")
    if mcore.version is None:
        out.append("megatron-core is not installed: run `make install`.")
    elif _minor(mcore.version) != SUPPORTED_MEGATRON:
        out.append(f"megatron-core {mcore.version} is installed but finevit supports only "
                   f"{_version(SUPPORTED_MEGATRON)}.x: pip install 'megatron-core>=0.19.2,<0.20'.")
    elif mcore.error and torch.version and not torch.error:  # else torch's failure explains it
        out.append(f"megatron-core {mcore.version} is installed but cannot be imported ({mcore.error}).")
    return out


def find_problems(facts: Facts) -> list:
    """One sentence per thing that makes this install unusable (an empty list: healthy)."""
    p, out = facts.packages, []
    if tuple(facts.python) < MIN_PYTHON:
        out.append(f"Python {_version(facts.python)} is too old: finevit needs Python "
                   f"{_version(MIN_PYTHON)} or newer, as megatron-core 0.19 does.")
    out += _core_problems(p)
    torch, vision = p["torch"], p["torchvision"]
    if torch.version and not torch.error:
        if vision.version is None:
            out.append("torchvision is not installed: run `make install`.")
        elif vision.error and "torchvision::nms does not exist" in vision.error:
            out.append(f"torchvision {vision.version} does not match torch {torch.version} (operator "
                       f"torchvision::nms does not exist): install the torchvision release built "
                       f"for this torch, e.g. torchvision 0.28.0 for torch 2.13.0.")
        elif vision.error:
            out.append(f"torchvision {vision.version} is installed but cannot be imported ({vision.error}).")
    if p["psutil"].version is None or p["psutil"].error:
        out.append("psutil is missing, and megatron-core's dist_checkpointing needs it to save "
                   "checkpoints: pip install psutil.")
    return out


def _yes_no(value: Optional[bool], yes: str = "available", no: str = "not available") -> str:
    return "unknown" if value is None else (yes if value else no)


def report(facts: Facts) -> list:
    """The report's lines: label, then what was found."""
    where = f" ({facts.executable})" if facts.executable else ""
    rows = [("python", _version(facts.python) + where)]
    rows += [(label, pkg.describe()) for label, pkg in facts.packages.items()]
    on_cpu = None if facts.nccl is None else not facts.devices
    if facts.nccl is None:
        cuda = "unknown (torch does not import)"
    elif facts.devices:
        names = ", ".join(facts.devices)
        cuda = f"available: {len(facts.devices)} device(s): {names}"
    else:
        build = f"torch built for CUDA {facts.cuda}" if facts.cuda else "CPU-only torch build"
        cuda = f"not available ({build})"
    rows += [
        ("cuda", cuda),
        ("nccl", _yes_no(facts.nccl)),
        ("gloo", _yes_no(facts.gloo)),
        ("layer spec", facts.layer_spec),
        ("attention", facts.attention),
        # parallel/cpu_backend.py is enabled exactly when CUDA is unavailable.
        ("cpu backend", _yes_no(on_cpu, "yes (no CUDA device: megatron-core runs on the CPU over gloo)",
                                "no (CUDA devices, NCCL)")),
    ]
    width = max(len(label) for label, _ in rows) + 2
    return [f"{label.ljust(width)}{value}" for label, value in rows]


def run(facts: Optional[Facts] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the report, then each problem as one sentence; 0 when healthy, 1 when broken."""
    facts = gather() if facts is None else facts
    for line in report(facts):
        print(line, file=out)
    found = find_problems(facts)
    for problem in found:
        print(f"finevit doctor: {problem}", file=err)
    return 1 if found else 0
