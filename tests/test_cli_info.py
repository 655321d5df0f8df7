import json
import os
import select
import shutil
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import torch
from conftest import PHOTOS, ROOT, assert_usage_error


def test_info_json_has_counted_params_and_macs(run_cli):
    result = run_cli("info", "mixnet_s", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert 4.0e6 < report["params"] < 4.2e6 and 250e6 < report["macs"] < 262e6
    assert report["weights"] == "random-init"
    assert report["preprocess"]["input_size"] == [3, 224, 224]
    assert any(layer["kernel_sizes"] == [3, 5, 7, 9, 11] for layer in report["mixconv_layers"])


def test_info_shows_its_progress(run_cli, monkeypatch):
    """Loading and planning take seconds (a download minutes): without a terminal, heartbeat lines
    on stderr; stdout holds the JSON alone."""
    import cli
    from conftest import HEARTBEAT

    monkeypatch.setattr(cli, "HEARTBEAT_S", 0.01)
    result = run_cli("info", "mixnet_m", "--plan", "auto", "--json")
    assert result.code == 0 and json.loads(result.out)["plan"]["layers"], result.err
    steps = {HEARTBEAT.sub("", line) for line in result.err.splitlines()}
    assert "loading mixnet_m" in steps and steps <= {"loading mixnet_m", "counting parameters and multiply-adds",
                                                     "planning for onnxruntime"}, steps


def test_info_table_says_random_init(run_cli):
    result = run_cli("info", "mixnet_m")
    assert result.code == 0
    assert "random-init" in result.out and "MixConv layers" in result.out and "3,5,7,9" in result.out


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "mixdeploy")
    proc = subprocess.run([exe, "info", "nixmet_s"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "did you mean mixnet_s" in proc.stderr


def test_help_does_not_load_pytorch():
    """`mixdeploy --help` and usage errors answer without importing torch (seconds of start-up)."""
    code = "import sys, cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\nprint(sorted({'torch', 'PIL'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "Usage: mixdeploy" in done.stdout, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_model_suggests_closest(run_cli, tmp_path):
    assert_usage_error(run_cli("info", "mixnet_ss"), "unknown model 'mixnet_ss'", "mixnet_s")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    assert_usage_error(run_cli("info", notes), "is a path, not a model name", "--checkpoint")
    assert_usage_error(run_cli("info", ""), "the model name is empty", "mixnet_s")


def test_missing_checkpoint(run_cli, tmp_path):
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", tmp_path / "nope.pth"), "does not exist")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root, to give up its override")
def test_a_path_this_user_may_not_reach_is_one_line(tmp_path):
    """Root without its override of file permissions, as any user is, before a folder of another
    user's that is closed to others: one line naming the path, exit 2, for every command's paths."""
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if subprocess.run([*drop, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("this machine does not let root give up capabilities (no CAP_SETPCAP)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    os.chown(locked, 65534, 65534)
    commands = [["export", "mixnet_s", "--format", "onnx", "-o", f"{locked}/m.onnx"],
                ["info", "mixnet_s", "--checkpoint", f"{locked}/w.pth"],
                ["quantize", "mixnet_s", "--format", "onnx", "--calib", str(locked)],
                ["info", f"{locked}/m.tflite"]]
    code = ("import json, sys, cli\nfor argv in json.loads(sys.argv[1]):\n    try:\n        cli.main(argv)\n"
            "    except SystemExit as exc:\n        print(exc.code, flush=True)\n        print('END', file=sys.stderr, flush=True)")
    done = subprocess.run([*drop, sys.executable, "-c", code,
                           json.dumps(commands)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    errors = done.stderr.split("END\n")[:-1]
    assert done.stdout.split() == ["2"] * len(commands) and len(errors) == len(commands), done.stderr
    for argv, error in zip(commands, errors):
        assert error.count("\n") == 1 and "Traceback" not in error, (argv, error)
        assert error.startswith("mixdeploy: error: ") and str(locked) in error, (argv, error)
        assert "permission denied" in error or "is not readable" in error, (argv, error)  # click's, for --calib


def test_a_permission_error_names_what_the_user_gave():
    from cli import _denied

    partial = PermissionError(13, "Permission denied", "/out/.m.onnx.4242.partial.float.onnx")
    assert _denied(partial) == "/out/m.onnx: permission denied; check the permissions of it and of its folders"
    assert _denied(PermissionError(1, "Operation not permitted")).startswith("permission denied (Operation not permitted)")


def test_directory_as_checkpoint(run_cli, tmp_path):
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", tmp_path), "is a directory")


def test_corrupt_checkpoint(run_cli, tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a zip file nor a pickle" * 10)
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", path), "is not a PyTorch file")
    truncated = tmp_path / "truncated.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", truncated), "cannot be read")
    damaged = tmp_path / "damaged.pth"  # its end record intact (is_zipfile says yes), its directory not
    torch.save(torch.nn.Linear(2, 2).state_dict(), damaged)
    damaged.write_bytes(damaged.read_bytes().replace(b"PK\x01\x02", b"XX\x01\x02"))
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", damaged), "cannot be read")
    whole = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), whole)  # a whole pickled model, not a state_dict
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", whole), "not only tensors", "model.state_dict()")
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", scripted), "TorchScript archive")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", bad), "cannot be read")
    legacy = tmp_path / "legacy.pth"  # only tensors, but a pickle torch's weights-only loader cannot read
    torch.save(torch.nn.Linear(2, 2).state_dict(), legacy, _use_new_zipfile_serialization=False, pickle_protocol=4)
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", legacy), "plain pickle", "torch.save(model.state_dict()")
    # torch's warning about the protocol went to stderr before the error line (pytest hides warnings in-process)
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mixdeploy"), "info", "mixnet_s",
                           "--checkpoint", legacy], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr


def test_checkpoint_of_another_architecture(run_cli, tmp_path):
    import timm

    path = tmp_path / "mbv2.pth"
    torch.save({"state_dict": timm.create_model("mobilenetv2_100").state_dict()}, path)
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", path), "does not fit mixnet_s", "missing keys, first")
    s_path = tmp_path / "s.pth"
    torch.save(timm.create_model("mixnet_s").state_dict(), s_path)
    assert_usage_error(run_cli("info", "mixnet_m", "--checkpoint", s_path), "does not fit mixnet_m")


def test_checkpoint_preprocess_labels_and_head_are_checked(run_cli, tmp_path):
    """A checkpoint's own 'preprocess' and 'labels' entries and its classifier are checked when read."""
    import timm

    state = timm.create_model("mixnet_s").state_dict()
    good = tmp_path / "good.pth"
    torch.save({"state_dict": state, "preprocess": {"input_size": [3, 192, 192], "interpolation": "bilinear"},
                "labels": [f"c{i}" for i in range(1000)]}, good)
    report = json.loads(run_cli("info", "mixnet_s", "--checkpoint", good, "--json").out)
    assert report["preprocess"]["input_size"] == [3, 192, 192] and report["preprocess"]["interpolation"] == "bilinear"
    assert report["labels"][:2] == ["c0", "c1"]
    lightning = tmp_path / "lightning.pth"  # a bare state_dict of a compiled model in a Lightning module, labels beside it
    torch.save({**{f"model._orig_mod.{k}": v for k, v in state.items()}, "labels": [f"c{i}" for i in range(1000)]}, lightning)
    assert json.loads(run_cli("info", "mixnet_s", "--checkpoint", lightning, "--json").out)["labels"][999] == "c999"
    for extras, fragment in (({"preprocess": {"bogus": 1}}, "unknown: bogus"), ({"preprocess": "224"}, "'preprocess' must map"),
                             ({"preprocess": {"input_size": [64, 64]}}, "preprocess input_size [64, 64] is not usable"),
                             ({"preprocess": {"input_size": [3, 8, 8]}}, "input_size [3, 8, 8] is not usable"),
                             ({"preprocess": {"interpolation": "nope"}}, "interpolation 'nope'"),
                             ({"preprocess": {"std": [0, 0, 0]}}, "std [0, 0, 0]"),
                             ({"preprocess": {"mean": [True, 0.5, float("nan")]}}, "mean [True, 0.5, nan]"),
                             ({"preprocess": {"crop_pct": True}}, "crop_pct True"),
                             ({"labels": 5}, "'labels' must be a list of 1000 class names"),
                             ({"labels": "cat"}, "'labels' must be a list"), ({"labels": ["a", "b"]}, "1000 class names")):
        path = tmp_path / "bad.pth"
        torch.save({"state_dict": state, **extras}, path)
        assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", path), f"checkpoint {path}", fragment)
    torch.save({**state, "classifier.weight": torch.tensor(1.0)}, tmp_path / "scalar.pth")
    assert_usage_error(run_cli("info", "mixnet_s", "--checkpoint", tmp_path / "scalar.pth"), "classifier.weight has shape ()")
    assert_usage_error(run_cli("info", "mixconv_mixnet_s"), "mixnet_s already has MixConv layers; use mixnet_s")


def test_pretrained_offline_says_how_to_pass_a_checkpoint(run_cli, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine's holds
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(proxy, raising=False)  # behind a proxy the hub itself is asked
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    assert_usage_error(run_cli("info", "mixnet_s", "--pretrained"), "unreachable", "--checkpoint PATH")
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # said offline: the cache alone, whatever DNS answers
    assert_usage_error(run_cli("info", "mixnet_s", "--pretrained"), "HF_HUB_OFFLINE is set", "--checkpoint PATH")
    assert_usage_error(run_cli("info", "mixconv_mobilenetv2_100", "--pretrained"), "has no pretrained weights")


def test_pretrained_weights_in_the_hub_cache_load_offline(tmp_path):
    """--pretrained with no network and the weights in the Hugging Face cache, as a download leaves
    them; a file exported from them is rebuilt from them, and refused once the cached weights change."""
    import timm
    from safetensors.torch import save_file

    repo = tmp_path / "models--timm--mixnet_s.ft_in1k"
    weights = repo / "snapshots" / ("0" * 40) / "model.safetensors"
    weights.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    with torch.random.fork_rng():
        torch.manual_seed(1)  # not load_model's seed: the weights must come from the cache
        save_file(timm.create_model("mixnet_s").state_dict(), weights)
    (tmp_path / "check.py").write_text(f"""
import torch
from safetensors.torch import load_file, save_file
from mixnet_deploy import MixdeployError, load_model
from mixnet_deploy.models import reload

saved = load_file({str(weights)!r})
loaded = load_model("mixnet_s", pretrained=True)
assert loaded.weights == "pretrained" and torch.equal(loaded.module.classifier.weight, saved["classifier.weight"])
meta = loaded.metadata()
assert torch.equal(reload(meta).module.classifier.weight, saved["classifier.weight"])
save_file({{k: v + 1 for k, v in saved.items()}}, {str(weights)!r})  # other weights under the same name
try:
    reload(meta)
except MixdeployError as exc:
    assert "differ from those the export was made from" in str(exc), exc
else:
    raise AssertionError("changed pretrained weights were not noticed")
""")
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")  # behind one the hub itself is asked
    env = {**{k: v for k, v in os.environ.items() if k not in proxies}, "HF_HUB_CACHE": str(tmp_path),
           "HF_ENDPOINT": "https://hub.invalid", "PYTHONPATH": str(ROOT)}  # offline
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py")], capture_output=True, text=True, cwd=ROOT,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_option_is_one_line(run_cli):
    assert_usage_error(run_cli("info", "mixnet_s", "--bogus"), "--bogus", "(see mixdeploy info --help)")
    assert_usage_error(run_cli("bogus"), "No such command 'bogus'", "(see mixdeploy --help)")
    assert_usage_error(run_cli("info", "mixnet_s", "--plan", ""), "--plan '' is neither")  # empty, not ignored
    for group in ([], ["device"]):  # a group called bare prints its help
        shown = run_cli(*group)
        assert shown.code == 0 and not shown.err and "Usage: mixdeploy" in shown.out and "Commands:" in shown.out


def test_info_prints_the_plan_an_export_would_use(run_cli, tmp_path):
    """`info MODEL --plan auto --target T` gives the cost model's plan for T; a plan FILE comes back as written."""
    from mixnet_deploy import load_model
    from mixnet_deploy.lower import analyse
    from mixnet_deploy.planner import make_plan

    loaded = load_model("mixnet_s")
    for target in ("onnxruntime", "litert"):
        result = run_cli("info", "mixnet_s", "--plan", "auto", "--target", target, "--json")
        assert result.code == 0, result.err
        plan = json.loads(result.out)["plan"]
        assert plan["target"] == target and plan["source"] == "auto"
        assert plan["layers"] == make_plan("auto", loaded.module, loaded.preprocess.input_size, target).layers
    plan["layers"] = dict.fromkeys(plan["layers"], "split")
    (tmp_path / "p.json").write_text(json.dumps(plan))
    mine = json.loads(run_cli("info", "mixnet_s", "--plan", tmp_path / "p.json", "--json").out)["plan"]
    assert mine["layers"] == plan["layers"]
    # the file's target, source and estimates (LiteRT's, here) are not this plan's; unnamed layers are listed too
    assert plan["source"] == "auto" and plan["target"] == "litert" and plan["estimates_ms"]
    assert (mine["source"], mine["target"], mine["estimates_ms"]) == ("file", "onnxruntime", {})
    (tmp_path / "part.json").write_text(json.dumps({**plan, "layers": {"blocks.2.0.conv_dw": "fold"}}))
    part = json.loads(run_cli("info", "mixnet_s", "--plan", tmp_path / "part.json", "--json").out)["plan"]
    assert (part["source"], part["target"], part["estimates_ms"]) == ("file", "onnxruntime", {})
    kinds = {layer.name: layer.kind for layer in analyse(loaded.module, loaded.preprocess.input_size)}
    assert part["layers"] == {**{name: "split" if kind == "depthwise" else "grouped" for name, kind in kinds.items()},
                              "blocks.2.0.conv_dw": "fold"}
    # a plan records what each layer was: mixnet_s's is refused by mixnet_m, whose layers share its names
    assert mine["shapes"]["blocks.2.0.conv_dw"] == "depthwise [48, 48, 48]->[48, 48, 48] kernels [3, 5, 7] stride 2"
    assert_usage_error(run_cli("info", "mixnet_m", "--plan", tmp_path / "p.json"),
                       "the plan was made for another model: its blocks.1.0.conv_pw is")
    table = run_cli("info", "mixnet_s", "--plan", "fold").out
    assert "blocks.5.2.conv_dw" in table and "fold" in table
    # a plan file is checked as export checks it: a choice the layer cannot take, a layer the model lacks
    for plan, fragment in (({"layers": {"blocks.2.0.conv_dw": 5}}, "plan choice 5 does not fit blocks.2.0.conv_dw"),
                           ({"layers": {"blocks.9.conv_dw": "split"}}, "not MixConv layers of this model: blocks.9.conv_dw"),
                           ({"layers": {}, "estimates_ms": "x"}, "estimates_ms maps layer names to milliseconds"),
                           ({"layers": {}, "estimates_ms": {"blocks.2.0.conv_dw": True}}, "to milliseconds"),
                           ({"layers": {}, "estimates_ms": {"blocks.2.0.conv_dw": -1.0}}, "0 or more"),
                           ({"layers": {}, "shapes": {"blocks.2.0.conv_dw": 3}}, "its shapes layer names to text"),
                           ({"layers": {}, "version": True}, "plan version True is not one")):
        (tmp_path / "bad.json").write_text(json.dumps({"version": 1, **plan}))
        assert_usage_error(run_cli("info", "mixnet_s", "--plan", tmp_path / "bad.json"), fragment)


def test_info_of_an_empty_or_unknown_file(run_cli, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_usage_error(run_cli("info", tmp_path / "empty.onnx"), "not a readable ONNX file")
    assert_usage_error(run_cli("info", tmp_path / "empty.onnx", "--plan", "auto", "--target", "litert"),
                       "--plan, --target go with a MODEL name")
    (tmp_path / "notes.txt").write_text("x")
    assert_usage_error(run_cli("bench", tmp_path / "notes.txt"), "reads .onnx and .tflite files")


def test_info_of_other_tools_onnx_files(run_cli, tmp_path):
    """Files mixdeploy did not write: a ZipMap-style output (a sequence of maps), an ai.onnx.ml-only
    opset, IR-3 weights listed as inputs, a float16 input, and metadata of another tool (Ultralytics'
    author and stride): described, never a traceback, and not taken for a mixdeploy file."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones(3, np.float16), "w")
    zipmap = helper.make_value_info("probabilities", helper.make_sequence_type_proto(helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))))
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT16, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 3]), zipmap], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)], ir_version=3)
    helper.set_model_props(model, {"author": "Ultralytics", "stride": "32"})
    onnx.save(model, tmp_path / "other.onnx")
    result = run_cli("info", tmp_path / "other.onnx", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [t["name"] for t in report["inputs"]] == ["x"] and report["precision"] == "fp16"
    assert report["outputs"][1] == {"name": "probabilities", "shape": None, "dtype": "sequence"}
    assert report["opset"] is None
    text = run_cli("info", tmp_path / "other.onnx")
    assert text.code == 0 and "not exported by mixdeploy" in text.out
    (tmp_path / "a[").mkdir()  # a path that reads as console markup is printed as it is
    odd = tmp_path / "a[" / "b][bold].onnx"
    onnx.save(model, odd)
    shown = run_cli("info", odd)
    assert shown.code == 0 and str(odd) in shown.out.replace("\n", ""), shown.err


def test_heartbeat_reaches_stderr_while_native_logs_are_silenced():
    """Without a terminal, long work prints its current step; TFLite's conversion points descriptor 2
    at /dev/null meanwhile (quiet_native_stderr), which must not swallow those lines."""
    from conftest import HEARTBEAT

    script = ("import time, cli\n"
              "from devices.runners import quiet_native_stderr\n"
              "cli.HEARTBEAT_S = 0.1\n"
              "with cli._progress('first') as step:\n"
              "    step('converting')\n"
              "    with quiet_native_stderr():\n"
              "        time.sleep(3)\n")  # some 30 beats: three of them arrive on a busy machine too
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 0 and all(HEARTBEAT.match(line) for line in lines), proc.stderr
    # a beat may fall before the step changes (a stalled thread); those during the silenced sleep name the step
    assert sum(line.endswith("converting") for line in lines) >= 3, proc.stderr
    assert all(line.endswith(("first", "converting")) for line in lines), proc.stderr


def test_spinner_keeps_drawing_while_native_logs_are_silenced():
    """On a terminal the spinner shows each step, also while TFLite's conversion has descriptor 2 at
    /dev/null (it froze there, its last step hidden until the conversion ended)."""
    script = ("import time, cli\n"
              "from devices.runners import quiet_native_stderr\n"
              "with cli._progress('first') as step:\n"
              "    with quiet_native_stderr():\n"
              "        step('converting')\n"
              "        time.sleep(1)\n"
              "    step('finishing')\n"
              "    time.sleep(0.3)\n")
    main, child = os.openpty()  # a real terminal for the child's stdin, stdout and stderr
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=child, stdout=child, stderr=child, cwd=ROOT,
                            env={**os.environ, "TERM": "xterm"})
    os.close(child)
    shown, deadline = b"", time.monotonic() + 30
    while time.monotonic() < deadline:
        if not select.select([main], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert proc.wait(timeout=30) == 0, shown
    assert b"converting" in shown and b"finishing" in shown, shown


@pytest.mark.parametrize("props, fragment", [
    ({"mixdeploy.parity": "not json"}, "mixdeploy.parity is a str"),
    ({"mixdeploy.weights": None}, "mixdeploy.weights is missing"),
    ({"mixdeploy.preprocess": {"input_size": [3, 8]}}, "mixdeploy.preprocess {'input_size': [3, 8]} is not usable"),
    ({"mixdeploy.preprocess": {"mean": [0.5, 0.5]}}, "mixdeploy.preprocess {'mean': [0.5, 0.5]} is not usable"),
    ({"mixdeploy.plan": {"layers": 3}}, "'layers' mapping"),
])
def test_damaged_metadata_is_one_line_everywhere(run_cli, tmp_path, props, fragment):
    """A file whose mixdeploy metadata was edited or damaged: info, quantize and bench say so in one line."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 32, 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    meta = {"mixdeploy.model": "mixnet_s", "mixdeploy.weights": "random-init",
            "mixdeploy.preprocess": {"input_size": [3, 32, 32]}, **props}
    helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()
                                   if v is not None})
    onnx.save(model, tmp_path / "m.onnx")
    for args in (["info"], ["quantize", "--calib", str(PHOTOS)], ["bench"]):
        assert_usage_error(run_cli(args[0], tmp_path / "m.onnx", *args[1:]), "metadata is damaged", fragment)


def test_damaged_tflite_metadata_is_one_line(run_cli, tmp_path):
    import flatbuffers

    from exporters.tflite_export import write_tflite
    from exporters.tflite_inspect import METADATA_NAME, _model, write_metadata

    path = tmp_path / "m.tflite"
    write_tflite(torch.nn.Sequential(torch.nn.ReLU()).eval(), (3, 32, 32), path)
    write_metadata(path, {"mixdeploy.model": "mixnet_s"})
    _, model = _model(path)
    entry = next(m for m in model.metadata if m.name == METADATA_NAME.encode())
    model.buffers[entry.buffer].data = np.frombuffer(b"[1, 2", dtype=np.uint8)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    assert_usage_error(run_cli("info", path), "metadata is damaged (not a JSON object)")
