"""A tampered model directory never loads: corrupted, truncated, bit-flipped, shape-changed, missing and extra
files, NaN weights, broken config.json; each refused by everything that opens a model directory (the Python
loaders, the service, ``mtrank serve | evaluate | predict | export | model verify``) with one line naming the
file. A sealed directory fails at its manifest; the same damage re-sealed (a tamperer with ``mtrank model
seal``, or a format-2 directory that has no manifest) fails at the loader's own checks."""

import json
import math
import pickle
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from mtrank.artifacts import ModelDirError, load_model, open_model_dir, write_manifest
from mtrank.cli import main
from mtrank.config import ModelConfig
from mtrank.model import MultiTaskModel
from mtrank.pipeline import fit
from mtrank.serve.service import ScoringService
from tabular_helpers import config, make_frame, one_torch_thread  # noqa: F401


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model directory as ``mtrank train`` writes it, and a labelled file to evaluate it on."""
    folder = tmp_path_factory.mktemp("trained")
    frame = make_frame(n=200)
    frame.to_csv(folder / "rows.csv", index=False)
    fit(config(train={"epochs": 1, "progress": False}), frame, output=folder / "model")
    return folder


def flip(path, offset: int = -1) -> None:
    """Flip one bit at ``offset`` (default: the file's last byte, in a safetensors file a tower's last bias)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_config(change):
    def edit(directory):
        meta = json.loads((directory / "config.json").read_text())
        change(meta)
        (directory / "config.json").write_text(json.dumps(meta))

    return edit


def set_weight(name_part: str, value: float):
    def edit(directory):
        state = load_file(str(directory / "model.safetensors"))
        name = next(k for k in state if name_part in k)
        state[name].view(-1)[0] = value
        save_file(state, str(directory / "model.safetensors"))

    return edit


def other_shapes(directory):
    """Weights of the same names and another expert width."""
    meta = json.loads((directory / "config.json").read_text())
    meta["model"]["experts"]["hidden"] = [5]
    save_file(MultiTaskModel(ModelConfig.from_dict(meta["model"])).state_dict(), str(directory / "model.safetensors"))


def unseal_as_format_2(directory):
    (directory / "manifest.json").unlink()
    edit_config(lambda meta: meta.update(format_version=2))(directory)


# damage -> the file the one-line error must name
SEALED = {
    "weights-truncated": (lambda d: truncate(d / "model.safetensors"), "model.safetensors"),
    "weights-one-bit-flipped": (lambda d: flip(d / "model.safetensors"), "model.safetensors"),
    "weights-header-bit-flipped": (lambda d: flip(d / "model.safetensors", 20), "model.safetensors"),
    "weights-of-other-shapes": (other_shapes, "model.safetensors"),
    "weights-with-a-NaN": (set_weight("towers", math.nan), "model.safetensors"),
    "weights-missing": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "config-truncated": (lambda d: truncate(d / "config.json"), "config.json"),
    "config-one-bit-flipped": (lambda d: flip(d / "config.json", 40), "config.json"),
    "config-missing": (lambda d: (d / "config.json").unlink(), "config.json"),
    "encoders-missing": (lambda d: (d / "encoders.json").unlink(), "encoders.json"),
    "encoders-one-bit-flipped": (lambda d: flip(d / "encoders.json", 100), "encoders.json"),
    "metrics-changed": (lambda d: flip(d / "metrics.json", 10), "metrics.json"),
    "history-missing": (lambda d: (d / "history.jsonl").unlink(), "history.jsonl"),
    "extra-file": (lambda d: (d / "notes.txt").write_text("hello"), "notes.txt"),
    "extra-blend.json": (lambda d: (d / "blend.json").write_text('{"weights": {"click": 1}}'), "blend.json"),
    "extra-weights-in-a-folder": (lambda d: copy_into(d, "spare"), "spare/model.safetensors"),
    "manifest-missing": (lambda d: (d / "manifest.json").unlink(), "manifest.json"),
    "manifest-truncated": (lambda d: truncate(d / "manifest.json"), "manifest.json"),
    "manifest-names-a-file-outside": (
        lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text().replace('"config.json"', '"../config.json"')
        ),
        "manifest.json",
    ),
}


def copy_into(directory, folder: str) -> None:
    (directory / folder).mkdir()
    shutil.copy(directory / "model.safetensors", directory / folder / "model.safetensors")


class Bomb:
    """Unpickled, it creates a file next to the model directory."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_bomb(directory) -> None:
    (directory / "model.safetensors").write_bytes(pickle.dumps({"weights": Bomb(directory.parent / "exploded")}))


# damage that a manifest written over it (re-sealed) does not hide from the loader's own checks
RESEALED = {
    "weights-truncated": (lambda d: truncate(d / "model.safetensors"), "model.safetensors: cannot read weights"),
    "weights-of-other-shapes": (other_shapes, "model.safetensors: tensor '"),
    "weights-with-a-NaN": (set_weight("towers", math.nan), "model.safetensors: tensor 'block.towers"),
    "weights-with-an-Inf": (set_weight("experts", math.inf), "model.safetensors: tensor 'block.levels"),
    "config-truncated-JSON": (lambda d: truncate(d / "config.json"), "config.json: corrupt JSON"),
    "config-not-UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"format": "\xff"}'), "config.json: cannot"),
    "config-a-list": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: not an mtrank model"),
    "config-without-model": (edit_config(lambda m: m.pop("model")), "config.json: no 'model'"),
    "config-without-format": (edit_config(lambda m: m.pop("format")), "config.json: not an mtrank model"),
    "config-model-a-string": (edit_config(lambda m: m.update(model="mmoe")), "config.json: 'model' must be"),
    "config-version-a-string": (edit_config(lambda m: m.update(format_version="3")), "config.json: format_version"),
    "config-plugins-a-number": (edit_config(lambda m: m.update(plugins=5)), "config.json: 'plugins' must be"),
    "config-experiment-a-list": (edit_config(lambda m: m.update(experiment=[])), "config.json: 'experiment' must"),
    "config-num_dense-a-word": (
        edit_config(lambda m: m["model"]["inputs"].update(num_dense="ten")),
        "config.json: model.inputs.num_dense",
    ),
    "config-unknown-block": (
        edit_config(lambda m: m["model"]["block"].update(type="moe")),
        "config.json: model.block.type",
    ),
    "config-without-tasks": (edit_config(lambda m: m["experiment"].pop("tasks")), "config.json: tasks"),
    "encoders-missing": (lambda d: (d / "encoders.json").unlink(), "encoders.json: missing; config.json says"),
    "encoders-truncated": (lambda d: truncate(d / "encoders.json"), "encoders.json: corrupt JSON"),
    "encoders-a-list": (lambda d: (d / "encoders.json").write_text("[]"), "encoders.json: not an mtrank encoder"),
    "weights-a-pickle-that-runs-code": (pickle_bomb, "model.safetensors: cannot read weights"),
}


def damaged(trained, tmp_path, damage, reseal: bool):
    directory = tmp_path / "model"
    shutil.copytree(trained / "model", directory)
    damage(directory)
    if reseal:
        write_manifest(directory, "model")
    return directory


def assert_refused(directory, names: str, trained, capsys, monkeypatch, openers=(open_model_dir, ScoringService)):
    """Every opener refuses ``directory`` with one line containing ``names``; no command starts serving."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("mtrank serve started on a damaged model"))
    for opener in openers:
        with pytest.raises(ModelDirError) as caught:
            opener(directory)
        message = str(caught.value)
        assert names in message and "\n" not in message, message
    data = str(trained / "rows.csv")
    commands = [["serve", directory], ["evaluate", directory, data], ["predict", directory, data, "-o", "s.parquet"]]
    commands += [["export", directory, "--format", "onnx"], ["model", "verify", directory]]
    for command in commands:
        capsys.readouterr()
        assert main([str(part) for part in command]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"mtrank {command[0]}: error: ") and names in err and "\n" not in err, err


@pytest.mark.parametrize("case", SEALED)
def test_a_damaged_sealed_model_directory_is_refused_naming_the_file(case, trained, tmp_path, capsys, monkeypatch):
    damage, name = SEALED[case]
    directory = damaged(trained, tmp_path, damage, reseal=False)
    openers = (open_model_dir, load_model, ScoringService)  # load_model: the weights alone, verified as well
    assert_refused(directory, f"{directory}/{name}: ", trained, capsys, monkeypatch, openers)


@pytest.mark.parametrize("case", RESEALED)
def test_damage_resealed_is_still_refused_by_the_loader_naming_the_file(case, trained, tmp_path, capsys, monkeypatch):
    damage, message = RESEALED[case]
    directory = damaged(trained, tmp_path, damage, reseal=True)
    assert_refused(directory, f"{directory}/{message}", trained, capsys, monkeypatch)
    assert not (tmp_path / "exploded").exists()  # nothing was unpickled


# audited exceptions: pickle between this run's own processes, never of anything read from disk
IN_MEMORY_PICKLE = {
    "data/streaming.py": "the encoder, pickled once by the trainer's process into shared memory for its own reader "
    "processes (forkserver): a blob this run wrote, in memory",
}


def test_nothing_in_mtrank_unpickles():
    """Weights are safetensors, everything else JSON: no pickle, no torch.load anywhere in the package (but the
    audited in-memory transfers between one run's processes, :data:`IN_MEMORY_PICKLE`)."""
    from pathlib import Path

    root = Path(__file__).parents[1] / "src" / "mtrank"
    sources = {path.relative_to(root).as_posix(): path.read_text() for path in root.rglob("*.py")}
    for pattern in ("import pickle", "torch.load(", "allow_pickle=True", "import joblib", "import dill"):
        allowed = IN_MEMORY_PICKLE if pattern == "import pickle" else {}
        assert [path for path, text in sources.items() if pattern in text and path not in allowed] == [], pattern
    for path in IN_MEMORY_PICKLE:  # the exception stays narrow: no file is opened for unpickling there
        assert "pickle.load(" not in sources[path] and "open(" not in sources[path], path


def test_the_intact_directory_loads_everywhere_and_verifies(trained, capsys):
    service = ScoringService(trained / "model")
    assert service.task_names == ["click", "buy"]
    assert main(["model", "verify", str(trained / "model")]) == 0
    assert ": ok, 6 files match manifest.json (written by mtrank" in capsys.readouterr().out


def test_a_format_2_directory_without_manifest_loads_with_a_warning_until_sealed(trained, tmp_path, capsys):
    directory = damaged(trained, tmp_path, unseal_as_format_2, reseal=False)
    with pytest.warns(UserWarning, match=r"no manifest.json .* add one with `mtrank model seal "):
        open_model_dir(directory)
    assert main(["model", "seal", str(directory)]) == 0
    assert "6 files (" in capsys.readouterr().out
    assert json.loads((directory / "config.json").read_text())["format_version"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sealed: no warning any more
        open_model_dir(directory)
    (directory / "encoders.json").unlink()
    with pytest.raises(ModelDirError, match="encoders.json: missing"):
        open_model_dir(directory)


def test_files_mtrank_adds_to_a_sealed_directory_are_recorded_in_its_manifest(trained, tmp_path):
    from mtrank.blend.rules import Blend
    from mtrank.export.model_dir import export_model_dir

    directory = damaged(trained, tmp_path, lambda d: None, reseal=False)
    Blend(weights={"click": 0.7, "buy": 0.3}).save(directory)
    export_model_dir(directory, "onnx")
    manifest = json.loads((directory / "manifest.json").read_text())["files"]
    assert {"blend.json", "export/model.onnx", "export/export.json"} <= set(manifest)
    assert ScoringService(directory).blend.weights == {"click": 0.7, "buy": 0.3}
    flip(directory / "blend.json", 5)  # a hand edit after the blend was recorded
    with pytest.raises(ModelDirError, match="blend.json: SHA-256 differs"):
        ScoringService(directory)
    with pytest.raises(ModelDirError, match="blend.json: SHA-256 differs"):  # nothing is recorded over it
        export_model_dir(directory, "onnx")


def test_weights_with_nan_written_by_save_model_are_refused_naming_the_tensor(tmp_path):
    from mtrank.artifacts import save_model

    model = MultiTaskModel(ModelConfig(inputs={"num_dense": 3}))
    with torch.no_grad():
        model.block.towers.layers[-1].bias[0] = math.nan  # the first task's output bias
    save_model(model, tmp_path / "m")
    with pytest.raises(ModelDirError, match=r"model.safetensors: tensor 'block.towers.layers.1.bias' holds 1 NaN/Inf"):
        load_model(tmp_path / "m")
