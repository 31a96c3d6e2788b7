"""User mistakes get one kiln error with a hint (the CLI: exit code 1, never "internal error", no traceback),
found before any work is done: paths, devices, option values, options that do not apply, sampling settings.
Also: artifacts are written with the umask's mode, like any file."""
import os
import stat

import pytest
import torch

import kiln
from kiln.cli import main
from kiln.models import registry

NO_CUDA = not torch.cuda.is_available()


def fails(capsys, argv, *parts) -> tuple[str, str]:
    """``kiln argv`` exits 1 with a kiln error containing ``parts``, and a hint; returns (stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 1, err
    assert "internal error" not in err and "Traceback" not in err
    for p in parts:
        assert p in err, err
    assert "hint:" in err, err
    return out, err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("ux") / "lin.kiln"
    kiln.compile(torch.nn.Linear(6, 3), (torch.randn(2, 6),), dynamic={"input": {0: ("batch", 1, 8)}}).save(path)
    return path


@pytest.fixture
def no_build(monkeypatch):
    """A compile that gets past its checks builds a model: make that a test failure (exit code 2)."""
    def refuse(name):
        raise AssertionError(f"built {name}: the mistake was not caught before the work")

    monkeypatch.setattr(registry, "get", refuse)


def test_a_directory_is_not_an_artifact(artifact, tmp_path, capsys):
    d = tmp_path / "models"
    d.mkdir()
    (d / "lin.kiln").write_bytes(artifact.read_bytes())
    for argv in (["run", d], ["inspect", d], ["bench", d], ["generate", d, "--ids", "1"]):
        _, err = fails(capsys, argv, f"{d} is a directory, not a .kiln artifact")
        assert str(d / "lin.kiln") in err  # the hint names the artifact inside
    with pytest.raises(kiln.ArtifactError, match="is a directory"):
        kiln.load(d)
    with pytest.raises(kiln.ArtifactError, match="is a directory"):
        kiln.Generator.load(tmp_path)


def test_output_paths_are_checked_before_compiling(artifact, tmp_path, capsys, no_build):
    fails(capsys, ["compile", "--model", "llama-tiny", "-o", tmp_path], f"{tmp_path} is a directory")
    missing = tmp_path / "no" / "such" / "x.kiln"
    fails(capsys, ["compile", "--model", "llama-tiny", "-o", missing], "does not exist", "does not create directories")
    fails(capsys, ["compile", "--model", "llama-tiny", "-o", tmp_path / "a.kiln", "--emit-onnx", missing], "does not exist")
    fails(capsys, ["compile", "--model", "llama-tiny", "-o", tmp_path / "a.kiln", "--report-json", tmp_path], "is a directory")
    (tmp_path / "a.onnx").write_bytes(b"")
    fails(capsys, ["compile", "--model", "llama-tiny", "-o", tmp_path / "a.kiln", "--emit-onnx", tmp_path / "a.onnx"],
          "a.onnx already exists", "--force")
    fails(capsys, ["inspect", artifact, "--onnx", missing], "does not exist")
    m = kiln.load(artifact)
    with pytest.raises(kiln.KilnError, match="does not exist"):
        m.save(missing)
    with pytest.raises(kiln.KilnError, match="is a directory"):
        m.save(tmp_path)
    assert not (tmp_path / "no").exists() and sorted(os.listdir(tmp_path)) == ["a.onnx"]


def test_devices_are_checked(artifact, tmp_path, capsys, no_build):
    for argv in (["run", artifact], ["bench", artifact], ["generate", artifact, "--ids", "1"],
                 ["compile", "--model", "llama-tiny", "-o", tmp_path / "x.kiln"]):
        fails(capsys, argv + ["--device", "bogus"], "device 'bogus' is not a device name", "cpu, cuda or cuda:N")
    fails(capsys, ["run", artifact, "--device", "meta"], "kiln runs on the CPU or a CUDA GPU")
    with pytest.raises(kiln.KilnError, match="not a device name"):
        kiln.load(artifact, device="bogus")
    if NO_CUDA:
        for argv in (["run", artifact], ["compile", "--model", "llama-tiny", "-o", tmp_path / "x.kiln"]):
            fails(capsys, argv + ["--device", "cuda"], "device 'cuda': this machine cannot run CUDA", "run on the CPU")
        with pytest.raises(kiln.KilnError, match="cannot run CUDA"):
            kiln.load(artifact, device="cuda:0")
    else:
        n = torch.cuda.device_count()
        fails(capsys, ["run", artifact, "--device", f"cuda:{n}"], f"this machine has {n} CUDA GPU")


def test_weights_must_be_a_checkpoint_directory(artifact, tmp_path, capsys, no_build):
    def compile_with(weights):
        return ["compile", "--model", "llama-tiny", "--weights", weights, "-o", tmp_path / "x.kiln"]

    fails(capsys, compile_with(tmp_path / "missing"), "no such directory", "config.json")
    fails(capsys, compile_with(artifact), "is a file, not a checkpoint directory")
    fails(capsys, compile_with(tmp_path), "has no config.json")


@pytest.mark.parametrize("buckets", ["1,x", "0", "-2", "", "2,,4"])
def test_batch_buckets_are_positive_sizes(buckets, tmp_path, capsys):
    fails(capsys, ["compile", "--model", "llama-tiny", "--generate", "--batch-buckets", buckets, "-o", tmp_path / "g.kiln"],
          f"--batch-buckets {buckets!r}: give batch sizes >= 1", "--batch-buckets 1,2,4,8")


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "temperature=-1.0: must be a finite number >= 0"),
    ("--temperature", "nan", "temperature=nan: must be a finite number >= 0"),
    ("--top-p", "0", "top_p=0.0: must be in (0, 1]"), ("--top-p", "1.5", "top_p=1.5: must be in (0, 1]"),
    ("--top-k", "-3", "top_k=-3: must be an int >= 0")])
def test_sampling_settings_out_of_range(flag, value, message, tmp_path, capsys):
    # the artifact does not exist: the settings are checked before it is read
    fails(capsys, ["generate", tmp_path / "none.kiln", "--ids", "1", flag, value], message)


@pytest.mark.skipif(not NO_CUDA, reason="the kernels backend runs on CUDA here")
def test_kernels_backend_on_the_cpu_needs_the_interpreter(artifact, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fails(capsys, ["bench", artifact, "--backend", "kernels"], "the kernels backend needs CUDA, and this runs on cpu",
          "TRITON_INTERPRET=1", "--backend reference")
    with pytest.raises(kiln.KilnError, match="needs CUDA"):
        kiln.load(artifact, backend="kernels")
    assert kiln.load(artifact, backend="reference").executor.backend == "reference"
    # kiln.compile and kiln.jit refuse it as clearly, before any kernel is tried (not "no gemm implementation ran")
    model, x = torch.nn.Linear(8, 8), torch.randn(2, 8)
    with pytest.raises(kiln.KilnError, match="needs CUDA"):
        kiln.compile(model, (x,), config=kiln.CompileConfig(backend="kernels"))
    with pytest.raises(kiln.KilnError, match="needs CUDA"):
        kiln.jit(model, config=kiln.CompileConfig(backend="kernels"))(x)


def test_dim_ranges_are_checked(artifact, tmp_path, capsys, no_build):
    out = ["-o", tmp_path / "x.kiln"]
    fails(capsys, ["compile", "--model", "llama-tiny", "--dim", "seq=5:2"] + out, "--dim 'seq=5:2': min 5 > max 2", "--dim seq=2:5")
    fails(capsys, ["compile", "--model", "llama-tiny", "--dim", "seq=0:8"] + out, "a dim is at least 1", "--dim seq=1:8")
    fails(capsys, ["run", artifact, "--dim", "batch=0"], "--dim 'batch=0': a dim is at least 1", "--dim batch=1")


def test_options_that_do_not_apply_are_refused(tmp_path, capsys, no_build):
    out = ["-o", tmp_path / "x.kiln"]
    fails(capsys, ["compile", "--model", "llama-tiny", "--max-seq", "64"] + out, "--max-seq applies only to a generator",
          "add --generate")
    fails(capsys, ["compile", "--model", "llama-tiny", "--max-seq", "64", "--batch-buckets", "1,2"] + out,
          "--max-seq and --batch-buckets apply only to a generator")
    fails(capsys, ["compile", "--model", "llama-tiny", "--generate", "--dim", "seq=1:8"] + out, "--generate sets its own dims")
    fails(capsys, ["compile", "--model", "llama-tiny", "--static", "--dim", "seq=1:8"] + out, "--static fixes every dim")
    (tmp_path / "m.pt2").write_bytes(b"")
    fails(capsys, ["compile", tmp_path / "m.pt2", "--generate"] + out, "apply to --model", "without them")


def test_outputs_of_run_and_bench_are_checked_before_running(artifact, tmp_path, capsys):
    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"keep")
    out, _ = fails(capsys, ["run", artifact, "--save-outputs", existing], "out.safetensors already exists", "--force")
    assert "inputs:" not in out and existing.read_bytes() == b"keep"  # nothing ran
    out, _ = fails(capsys, ["bench", artifact, "--json", existing], "already exists", "--force")
    assert "median" not in out and existing.read_bytes() == b"keep"
    assert main(["run", str(artifact), "--save-outputs", str(existing), "--force", "-q", "--repeat", "0"]) == 0
    assert existing.read_bytes() != b"keep"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_artifacts_are_written_with_the_umask_mode(artifact, tmp_path, umask, mode):
    m = kiln.load(artifact)
    old = os.umask(umask)
    try:
        path = m.save(tmp_path / "m.kiln")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert os.umask(old) == old  # save left the process's umask as it was
