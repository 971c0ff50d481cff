"""Print the versions quantlite runs with and which kernel back-ends are live here (and why not).

A back-end is "live" when qmatmul can run it on this machine: "cuda" (native CUDA library, needs a
GPU and `make native`), "triton" (needs a GPU, or TRITON_INTERPRET=1 to run on the CPU slowly),
"cpu" (native CPU library, `make native`), "torch" (the reference, always). qmatmul picks cuda >
triton > torch for GPU tensors and cpu > torch for CPU tensors (docs/kernels.md).

Examples:
  quantlite info                          # versions, GPU, native libraries, back-ends (why each dead one is)
  quantlite info --json                   # the same as one JSON object, for scripts and bug reports
  TRITON_INTERPRET=1 quantlite info       # Triton's kernels become live on a CPU-only machine
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata

SUMMARY = "versions of python/torch/triton/transformers/CUDA and which kernel back-ends are live"
PACKAGES = ("torch", "triton", "transformers", "safetensors", "bitsandbytes")


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for section in ("versions", "machine", "native"):
        print(section)
        for name, value in report[section].items():
            print(f"  {name:<13} {value}")
    print("kernel back-ends")
    for name, reason in report["backends"].items():
        print(f"  {name:<7} {'live' if reason is None else 'not available: ' + reason}")
    print("qmatmul's choice when no back-end is named")
    for device, name in report["default_backend"].items():
        print(f"  {device} tensors -> {name}")
    return 0


def collect() -> dict:
    """{"versions": {...}, "machine": {...}, "native": {file: path or why missing},
    "backends": {name: None | reason}, "default_backend": {"cpu": name, "cuda": name}}."""
    import torch

    import quantlite
    from quantlite import native
    from quantlite.kernels.dispatch import available_backends, default_backend

    versions = {"quantlite": quantlite.__version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["torch CUDA"] = torch.version.cuda or "none (CPU build)"
    versions["nvcc"] = _nvcc_version()

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu cores": os.cpu_count(),
        "gpu": ", ".join(gpus) or "none visible",
    }
    return {"versions": versions, "machine": machine, "native": native.locations(), "backends": available_backends(),
            "default_backend": {device: default_backend(device) for device in ("cpu", "cuda")}}


def _nvcc_version() -> str:
    """The CUDA compiler `make native` would use: its release line, or why there is none."""
    nvcc = shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")
    if nvcc is None:
        return "not found on PATH"
    try:
        output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{nvcc} did not answer ({error})"
    release = next((line for line in output.splitlines() if "release" in line), output.strip())
    return f"{release.strip()} ({nvcc})"
