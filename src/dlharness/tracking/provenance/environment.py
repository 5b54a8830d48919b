"""Facts about the machine, the software and the source a run used, as MLflow tags and files."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

# Devices, threads, distributed launch, cluster job and MLflow client settings.
RECORDED_VARIABLES = re.compile(
    r"(CUDA|NCCL|SLURM|MLFLOW|OMP|MKL|TORCH|PL)_\w+|WORLD_SIZE|MASTER_ADDR|MASTER_PORT"
    r"|NODE_RANK|LOCAL_RANK|RANK"
)
# Bytes per GiB; `gpu.memory_gb` is reported in GiB, as nvidia-smi and torch do.
GIB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class Environment:
    accelerator: str
    devices: int  # per node, as Lightning counts them
    precision: str
    gpus: tuple[GpuInfo, ...] = ()
    cuda_version: str | None = None
    cudnn_version: str | None = None
    nvidia_driver: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    host_cpu: str = ""
    host_cores: int = 0
    # Launch variables that change how training runs, by name (secret ones are redacted
    # when logged).
    variables: dict[str, str] = field(default_factory=dict)
    nodes: int = 1


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML library, no driver, or no permission: report nothing
        return None
    return driver.decode() if isinstance(driver, bytes) else str(driver)


def collect_environment(
    accelerator: str, devices: int, precision: str, nodes: int = 1
) -> Environment:
    """Read the environment of this process; GPU facts only where torch uses CUDA."""
    gpus: tuple[GpuInfo, ...] = ()
    if accelerator == "gpu" and torch.cuda.is_available():
        gpus = tuple(
            GpuInfo(
                name=torch.cuda.get_device_name(i),
                memory_bytes=torch.cuda.get_device_properties(i).total_memory,
                compute_capability=torch.cuda.get_device_capability(i),
            )
            for i in range(torch.cuda.device_count())
        )
    cudnn = torch.backends.cudnn.version() if gpus else None
    return Environment(
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        nodes=nodes,
        gpus=gpus,
        cuda_version=torch.version.cuda if gpus else None,
        cudnn_version=str(cudnn) if cudnn else None,
        nvidia_driver=_nvidia_driver() if gpus else None,
        versions={
            "torch": torch.__version__,
            "lightning": _version("lightning"),
            "mlflow": _version("mlflow"),
            "python": platform.python_version(),
        },
        host_cpu=_cpu_model(),
        host_cores=os.cpu_count() or 0,
        variables={
            name: value
            for name, value in sorted(os.environ.items())
            if RECORDED_VARIABLES.fullmatch(name)
        },
    )


def environment_tags(env: Environment) -> dict[str, str]:
    """The `env.*`, `gpu.*`, version and host tags; GPU keys only when a GPU was used."""
    tags = {
        "env.accelerator": env.accelerator,
        "env.devices": str(env.devices),
        "env.nodes": str(env.nodes),
        "env.world_size": str(env.devices * env.nodes),
        "env.precision": env.precision,
        "gpu.count": str(len(env.gpus)),
        **{f"{name}.version": version for name, version in env.versions.items()},
        "host.cpu": env.host_cpu,
        "host.cores": str(env.host_cores),
        **{f"env.var.{name}": value for name, value in env.variables.items()},
    }
    if env.gpus:
        first = env.gpus[0]
        tags["gpu.name"] = ", ".join(sorted({gpu.name for gpu in env.gpus}))
        tags["gpu.memory_gb"] = f"{first.memory_bytes / GIB:.1f}"
        tags["gpu.compute_capability"] = ".".join(map(str, first.compute_capability))
        optional = {
            "cuda.version": env.cuda_version,
            "cudnn.version": env.cudnn_version,
            "nvidia.driver": env.nvidia_driver,
        }
        tags.update({key: value for key, value in optional.items() if value})
    return tags


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool


def git_state(folder: Path) -> GitState | None:
    """The commit checked out around `folder`, and whether tracked files differ from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changes = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return GitState(commit=commit, dirty=bool(changes))
