"""The conveniences a nanoGPT / litgpt user reaches for: discoverable configs, trackers through Accelerate,
an installable package with quiet logs."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _no_wandb():
    os.environ["WANDB_MODE"] = "disabled"


def shown(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_10_help_lists_every_key_and_print_config_prints_without_running(tmp_path, capsys):
    from configs import TASKS, ConfigError, LoggingConfig, RunConfig, TrainConfig, from_dict, load_config

    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    sections = [(RunConfig, ""), (TrainConfig, "train."), (LoggingConfig, "logging.")]
    sections += [(cls, prefix) for model, data in TASKS.values() for cls, prefix in ((model, "model."), (data, "data."))]
    for cls, prefix in sections:
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                continue  # a section, listed key by key
            entry = f"{prefix}{f.name}={shown(default)}"
            found = [line for line in lines if line.split() and line.split()[0] == entry]
            assert found, f"{entry} is not in --help"
            assert all(len(line.split()) > 1 for line in found), f"{entry} has no meaning in --help"
    gate = next(line for line in lines if line.split() and line.split()[0] == "model.gate=none")
    assert "headwise" in gate and "elementwise" in gate

    # --print-config: the resolved config as YAML, which reads back as the same config; nothing is written.
    args = [f"out_dir={tmp_path / 'out'}", "name=shown", "model.attention=sigmoid", "train.max_steps=7"]
    assert train.main(["--print-config", *args]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert dataclasses.asdict(from_dict(printed)) == dataclasses.asdict(load_config(None, args))
    assert printed["model"]["attention"] == "sigmoid" and printed["train"]["max_steps"] == 7
    assert not (tmp_path / "out").exists()

    # model.gate=no (YAML 1.1 reads it as false) lists the allowed gates like any other bad value.
    assert train.main([f"out_dir={tmp_path / 'out'}", "model.gate=no"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: model.gate='no' is not one of ['none', 'headwise', 'elementwise']"]
    assert load_config(None, ["logging.progress=no"]).logging.progress is False  # a boolean key still takes it
    with pytest.raises(ConfigError, match="quote the text"):
        from_dict({"model": {"gate": False}})  # the same slip in a YAML file
    assert not (tmp_path / "out").exists()


def test_11_trackers_through_accelerate_namespaced_under_the_run_dir(word_corpus, tmp_path, monkeypatch, capsys):
    from accelerate import tracking
    from accelerate.tracking import GeneralTracker, get_available_trackers

    from trainer.metrics import read_rows

    base = [f"data.cache_dir={word_corpus / 'cache'}", f"data.source={word_corpus / 'corpus'}", "data.vocab_size=300",
            "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=2",
            "train.micro_batch_size=2", "train.warmup_steps=1", "train.max_steps=2", "train.eval_interval=2",
            "train.eval_windows=2", "logging.progress=false", f"out_dir={tmp_path}"]

    assert train.main([*base, "logging.tracker=bogus"]) == 2
    err = capsys.readouterr().err
    assert "logging.tracker='bogus'" in err and "tensorboard" in err and "wandb" in err
    if "tensorboard" not in {str(t) for t in get_available_trackers()}:
        assert train.main([*base, "name=tb", "logging.tracker=tensorboard"]) == 2  # Accelerate would drop it silently
        assert "pip install tensorboard" in capsys.readouterr().err
        assert not (tmp_path / "tb").exists()
    else:
        assert train.main([*base, "name=tb", "logging.tracker=tensorboard"]) == 0
        assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))  # under the run dir

    # wandb's place taken by a recorder: what Accelerate hands the tracker, and every row it logs.
    calls = {"init": [], "log": []}

    class Recorder(GeneralTracker):
        name, requires_logging_directory, main_process_only = "wandb", False, True

        def __init__(self, project, **kwargs):
            super().__init__()
            calls["init"].append((project, kwargs))

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            calls["config"] = values

        def log(self, values, step=None, **kwargs):
            calls["log"].append((step, values))

    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "wandb", Recorder)  # the dict Accelerate looks trackers up in
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert train.main([*base, "name=tracked", "logging.tracker=wandb"]) == 0
    run = tmp_path / "tracked"
    [(project, kwargs)] = calls["init"]
    assert project == "sinklab" and kwargs["dir"] == str(run) and kwargs["name"] == "tracked"
    assert calls["config"]["logging"]["tracker"] == "wandb"
    logged = {(step, k): v for step, values in calls["log"] for k, v in values.items()}
    rows = read_rows(run / "metrics.jsonl")
    for row in rows:
        split = row.get("split", "train")
        for k, v in row.items():
            if k in ("step", "split") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            assert logged[(row["step"], f"{split}/{k.removeprefix('val_') if split == 'val' else k}")] == v
    assert {k.split("/")[0] for _, k in logged} == {"train", "val", "sink"}
    assert (2, "val/loss") in logged and (2, "sink/sink_1") in logged and (1, "train/loss") in logged


def test_12_an_installable_package_with_quiet_logs(word_corpus, capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"]
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(f"{name}*" in include for name in packages), (packages, include)
    for module in project["tool"]["setuptools"]["py-modules"]:
        assert (ROOT / f"{module}.py").is_file()
    # One fresh interpreter: every console command's function imports, and DeepSpeed (imported after the
    # project, as accelerate and transformers import it) prints no accelerator warning on a machine without a GPU.
    targets = [target.split(":") for target in project["project"]["scripts"].values()]
    check = "import importlib\n" + "".join(f"assert callable(importlib.import_module({m!r}).{f})\n" for m, f in targets)
    out = subprocess.run([sys.executable, "-c", check + "import deepspeed"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    assert "Setting accelerator to CPU" not in out.stdout + out.stderr
    assert {"deepspeed", "eval", "vit", "gpu", "dev"} <= set(project["project"]["optional-dependencies"])

    # constraints.txt is a set of versions the suite passed on, for `-c constraints.txt`: it pins every
    # requirement, each pin satisfies the specifiers of requirements.txt and pyproject.toml, and every runtime
    # dependency of pyproject is in requirements.txt. Not compared with what is installed today: the registry
    # moves on, and an unpinned `pip install -r requirements.txt` may take newer releases.
    from packaging.requirements import Requirement

    def canonical(name):
        return name.lower().replace("_", "-")

    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = {canonical(k): v for k, v in pins.items()}
    required = [Requirement(line.split("#")[0].strip())
                for line in (ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()]
    declared = [Requirement(r) for r in project["project"]["dependencies"]]
    declared += [Requirement(r) for extra in project["project"]["optional-dependencies"].values() for r in extra]
    for req in required + declared:
        name = canonical(req.name)
        if name == "flash-attn":
            continue  # builds against the user's CUDA torch; never installed on the CPU test machine
        assert name in pins, f"{name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} does not satisfy {req}"
    runtime = {canonical(Requirement(r).name) for r in project["project"]["dependencies"]}
    missing = runtime - {canonical(r.name) for r in required}
    assert not missing, f"runtime dependencies of pyproject.toml missing from requirements.txt: {missing}"
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()

    # No data-prep progress bars off a terminal.
    from data.config import DataConfig
    from data.prepare import prepare

    capsys.readouterr()
    prepare(DataConfig(source=str(word_corpus / "corpus"), vocab_size=290, cache_dir=str(word_corpus / "bars")),
            progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" not in err and "reading documents" not in err and "it/s" not in err


def test_every_third_party_import_is_declared():
    """Each package the project's code or tests import is named in requirements.txt (what the README installs),
    or, where the import is guarded as optional, in a pyproject extra. A package that only arrived as another's
    dependency, or was installed by hand, fails here, not on a new user's machine."""
    import ast
    from importlib import metadata

    from packaging.requirements import Requirement

    def canonical(name):
        return name.lower().replace("_", "-")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    required = {canonical(Requirement(line.split("#")[0].strip()).name)
                for line in (ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()}
    extras = {canonical(Requirement(r).name) for extra in project["project"]["optional-dependencies"].values()
              for r in extra}
    optional = {"triton": "triton", "flash_attn": "flash-attn"}  # import-guarded fast kernels (the gpu extra)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "--", "*.py"],
                           capture_output=True, text=True, check=True).stdout.split()
    local = {Path(f).parts[0].removesuffix(".py") for f in files} | {Path(f).stem for f in files}
    imported = {}
    for f in files:
        for node in ast.walk(ast.parse((ROOT / f).read_text(), f)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    imported.setdefault(top, f)
    distributions = metadata.packages_distributions()
    for top, where in sorted(imported.items()):
        if top in optional:
            assert optional[top] in extras, f"{top} ({where}) is optional but in no pyproject extra"
            continue
        names = {canonical(d) for d in distributions.get(top, [])}
        assert names, f"{where} imports {top}, which is not installed: add its package to requirements.txt"
        assert names & required, f"{where} imports {top} ({sorted(names)}), which requirements.txt does not name"
