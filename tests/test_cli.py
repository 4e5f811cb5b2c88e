"""The `finevit` command: doctor (the real console script once, broken installs as facts) and
`config show`."""

import importlib.metadata
import io
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml

from finevit import doctor
from finevit.cli import main
from finevit.config import load_config
from finevit.doctor import Facts, Package

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/model/tiny.yaml")


def table(lines) -> dict:
    """doctor's report as {label: value}; labels and values are separated by 2+ spaces."""
    return dict(re.split(r"\s{2,}", line.rstrip(), maxsplit=1) for line in lines)


@pytest.mark.slow  # a fresh process importing torch, torchvision and megatron-core
def test_doctor_console_script_on_this_install():
    script = Path(sys.executable).parent / "finevit"
    assert script.is_file(), f"{script} is missing: install the project with `make install`"
    run = subprocess.run([str(script), "doctor"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "finevit doctor:" not in run.stderr  # no problem sentences
    rows = table(run.stdout.splitlines())
    labels = ["python", "cuda", "nccl", "gloo", "layer spec", "attention", "cpu backend"]
    for label in doctor.REPORT_ORDER + labels:
        assert label in rows, f"doctor printed no '{label}' line:\n{run.stdout}"
    for dist in ("torch", "megatron-core", "psutil"):
        assert rows[dist] == importlib.metadata.version(dist)
    assert rows["python"].startswith(".".join(map(str, sys.version_info[:3])))
    assert rows["gloo"] == "available"
    # The CPU backend is used exactly when no CUDA device is visible.
    on_cpu = rows["cuda"].startswith("not available")
    assert rows["cpu backend"].startswith("yes" if on_cpu else "no")
    if rows["transformer-engine"] == "not installed":
        assert rows["layer spec"].startswith("local") and rows["attention"] == "torch SDPA per packed segment"


def healthy(**changes) -> Facts:
    packages = {label: Package("1.0") for label in doctor.REPORT_ORDER}
    packages.update({"torch": Package("2.13.0"), "torchvision": Package("0.28.0"),
                     "megatron-core": Package("0.19.2"), "transformer-engine": Package(),
                     "apex": Package(), "flash-attn": Package()})
    packages.update(changes)
    return Facts(python=(3, 12, 1), packages=packages, nccl=True, gloo=True, use_te=False,
                 layer_spec="local", attention="torch SDPA per packed segment")


def test_healthy_facts_have_no_problems():
    assert doctor.find_problems(healthy()) == []


NVCUDA = "ImportError: libcudart.so.13: cannot open shared object file"
NMS = "RuntimeError: operator torchvision::nms does not exist"
BROKEN = [
    (dict(python=(3, 11, 9)), "Python 3.11.9 is too old: finevit needs Python 3.12 or newer"),
    (dict(torch=Package()), "torch is not installed: run `make install`."),
    (dict(torch=Package("2.13.0", NVCUDA)), f"torch 2.13.0 is installed but cannot be imported ({NVCUDA})."),
    (dict(**{"megatron-core": Package()}), "megatron-core is not installed"),
    (dict(**{"megatron-core": Package("0.18.1")}),
     "megatron-core 0.18.1 is installed but finevit supports only 0.19.x"),
    (dict(**{"megatron-core": Package("0.20.0rc1")}),
     "megatron-core 0.20.0rc1 is installed but finevit supports only 0.19.x"),
    (dict(**{"megatron-core": Package("0.19.2", "ModuleNotFoundError: No module named 'einops'")}),
     "megatron-core 0.19.2 is installed but cannot be imported (ModuleNotFoundError: No module named 'einops')."),
    (dict(torchvision=Package("0.27.0", NMS)),
     "torchvision 0.27.0 does not match torch 2.13.0 (operator torchvision::nms does not exist)"),
    (dict(torchvision=Package()), "torchvision is not installed"),
    (dict(psutil=Package()), "psutil is missing, and megatron-core's dist_checkpointing needs it"),
]


@pytest.mark.parametrize("change, fragment", BROKEN, ids=[b[1][:40] for b in BROKEN])
def test_broken_install_is_one_sentence(change, fragment):
    python = change.pop("python", (3, 12, 1))
    facts = healthy(**change)
    facts.python = python
    found = doctor.find_problems(facts)
    assert len(found) == 1 and fragment in found[0], found
    assert found[0].endswith(".") and "\n" not in found[0]


def test_broken_torch_is_not_blamed_on_what_depends_on_it():
    facts = healthy(torch=Package("2.13.0", NVCUDA), torchvision=Package("0.28.0", NVCUDA),
                    **{"megatron-core": Package("0.19.2", NVCUDA)})
    assert doctor.find_problems(facts) == [f"torch 2.13.0 is installed but cannot be imported ({NVCUDA})."]


def test_run_prints_report_then_problems_and_exits_1():
    out, err = io.StringIO(), io.StringIO()
    assert doctor.run(healthy(psutil=Package()), out, err) == 1
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("finevit doctor: psutil is missing")
    assert "transformer-engine  not installed" in out.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert doctor.run(healthy(), out, err) == 0 and err.getvalue() == ""


def test_report_describes_unusable_and_unrelated_packages():
    facts = healthy(**{"transformer-engine": Package("2.20.2", "OSError: libcudnn.so.9: cannot open"),
                       "apex": Package(note="the installed 'apex' 0.9.10 is not NVIDIA apex")})
    facts.devices = ["NVIDIA H100 80GB HBM3"] * 2
    lines = table(doctor.report(facts))
    assert lines["transformer-engine"] == "2.20.2, but import fails: OSError: libcudnn.so.9: cannot open"
    assert lines["apex"] == "not installed (the installed 'apex' 0.9.10 is not NVIDIA apex)"
    assert lines["cuda"] == "available: 2 device(s): NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3"
    assert lines["cpu backend"].startswith("no")


def test_import_failure_such_as_te_without_cudnn_is_caught(tmp_path, monkeypatch):
    (tmp_path / "fake_te.py").write_text("raise OSError('libcudnn.so.9: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(doctor, "_dist_version", lambda dist: "2.20.2")
    pkg = doctor._imported("fake_te", "transformer-engine")
    assert (pkg.version, pkg.error) == ("2.20.2", "OSError: libcudnn.so.9: cannot open shared object file")
    monkeypatch.setattr(doctor, "_dist_version", lambda dist: None)
    assert doctor._imported("no_such_module_here", "no-such-dist") == Package()


def test_apex_means_nvidia_apex(monkeypatch):
    monkeypatch.setattr(doctor, "_dist_version", lambda dist: "0.9.10")
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # PyPI's unrelated apex
    monkeypatch.setitem(sys.modules, "amp_C", None)  # None in sys.modules makes import fail
    assert doctor._apex() == Package(note="the installed 'apex' 0.9.10 is not NVIDIA apex")
    monkeypatch.setitem(sys.modules, "apex.normalization", types.ModuleType("apex.normalization"))
    assert doctor._apex() == Package("0.9.10")


def test_config_show_prints_the_resolved_config(capsys, tmp_path):
    assert main(["config", "show", TINY, "model.vision.num_layers=4", "--world-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["model"]["vision"]["num_layers"] == 4
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    assert load_config(resolved) == load_config(TINY, ["model.vision.num_layers=4"])


def test_config_show_reports_every_problem_with_exit_2(capsys):
    assert main(["config", "show", TINY, "parallel.tensor=3", "--world-size", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == textwrap.dedent("""\
        finevit config: model.vision.num_heads=4 is not divisible by parallel.tensor=3
        finevit config: model.vision.ffn_hidden_size=128 is not divisible by parallel.tensor=3
        finevit config: world size 4 is not divisible by parallel.tensor x parallel.pipeline = 3 x 1
        """)


@pytest.mark.parametrize("args, message", [
    (["config", "show", "nowhere.yaml"], "does not exist"),
    (["config", "show", TINY, "model.vision.num_layrs=4"], "model.vision.num_layrs is not a config key"),
])
def test_config_show_load_errors_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("args", [[], ["config"], ["nonsense"], ["config", "show", TINY, "--world-size", "x"]])
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "usage: finevit" in capsys.readouterr().err
