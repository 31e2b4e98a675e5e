"""Every kernels/*.cu compiles (NVRTC for compute_75 and compute_90; nvcc -ptx where on PATH) and follows the rules."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from skystack.engine.errors import KernelCompileError
from skystack.kernels import KERNEL_DIR, list_sources, parse_kernels, read_source, strip_comments
from skystack.kernels import nvrtc

ARCHS = ["compute_75", "compute_90"]
SOURCES = list_sources()

needs_nvrtc = pytest.mark.skipif(
    not nvrtc.nvrtc_available(),
    reason=f"NVRTC library not installed ({nvrtc.nvrtc_unavailable_reason()}); pip install -e .[dev]",
)
needs_nvcc = pytest.mark.skipif(nvrtc.nvcc_path() is None, reason="nvcc is not on PATH")


def define_sets(text: str) -> list[tuple[str, ...]]:
    """The defines a source is checked with: none, plus one set per ``// compile-check-defines:`` line."""
    sets = [()]
    for m in re.finditer(r"^\s*//\s*compile-check-defines:(.*)$", text, flags=re.M):
        sets.append(tuple(m.group(1).split()))
    return sets


def check_nvrtc(text: str, name: str, arch: str) -> None:
    """Compile ``text`` with NVRTC under each define set; every kernel must appear in the PTX."""
    for defines in define_sets(text):
        ptx = nvrtc.compile_ptx(text, arch=arch, defines=defines, name=name)
        for kernel in parse_kernels(text):
            assert re.search(rf"\.entry\s+{kernel}\b", ptx), f"{name}: {kernel} missing from the PTX"


def lint(text: str) -> list[str]:
    """Rule violations of a kernel source (empty when it follows the kernel rules)."""
    src = strip_comments(text)
    problems = []
    for m in re.finditer(r"__global__", src):
        if not re.search(r'extern\s+"C"\s+$', src[max(0, m.start() - 40):m.start()]):
            line = src.count("\n", 0, m.start()) + 1
            problems.append(f'line {line}: __global__ without extern "C"')
    for pattern, why in (
        (r"__shfl\w*|__ballot\w*|__any_sync|__all_sync|__activemask|__syncwarp|__match_\w+|__reduce_\w+_sync",
         "warp intrinsic"),
        (r"__syncthreads\w*", "__syncthreads"),
        (r"__shared__", "shared memory"),
        (r"^\s*#\s*include", "#include (sources must be self-contained)"),
        (r"<<<", "dynamic parallelism"),
    ):
        for m in re.finditer(pattern, src, flags=re.M):
            line = src.count("\n", 0, m.start()) + 1
            problems.append(f"line {line}: {why} ({m.group(0).strip()})")
    kernels = parse_kernels(text)
    if re.search(r"__global__", src) and not kernels:
        problems.append("no parsable extern \"C\" __global__ entry point")
    for name in kernels:  # grid-stride: the body must use gridDim (grids are capped at MAX_BLOCKS)
        start = re.search(rf"\b{name}\s*\(", src).end()
        body_open = src.find("{", start)
        depth, j = 0, body_open
        while j < len(src):
            depth += {"{": 1, "}": -1}.get(src[j], 0)
            j += 1
            if depth == 0:
                break
        if "gridDim" not in src[body_open:j]:
            problems.append(f"kernel {name}: no grid-stride loop (gridDim unused)")
    return problems


# ----------------------------------------------------------------------------- every source


def test_there_are_kernel_sources():
    assert {"rawconv.cu", "combine.cu"} <= set(SOURCES)


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES)
def test_nvrtc_compiles(src, arch):
    check_nvrtc(read_source(src), src, arch)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES)
def test_nvcc_compiles(src, arch):
    for defines in define_sets(read_source(src)):
        ptx = nvrtc.compile_nvcc_ptx(KERNEL_DIR / src, arch, defines)
        assert ".entry" in ptx


@pytest.mark.parametrize("src", SOURCES)
def test_follows_kernel_rules(src):
    assert lint(read_source(src)) == []


# ----------------------------------------------------------------------------- the checks can fail


def _broken_copy() -> str:
    good = read_source("rawconv.cu")
    bad = good.replace("out[i] = (VALUE - b) / r;", "out[i] = (VALUE - black) / r;")
    assert bad != good
    return bad


@needs_nvrtc
def test_broken_kernel_fails_nvrtc_with_its_log():
    with pytest.raises(KernelCompileError) as err:
        check_nvrtc(_broken_copy(), "rawconv.cu", "compute_75")
    msg = str(err.value)
    assert 'rawconv.cu(' in msg and 'identifier "black" is undefined' in msg


@needs_nvrtc
def test_missing_semicolon_fails_nvrtc():
    text = read_source("combine.cu").replace("a = a2;", "a = a2", 1)
    with pytest.raises(KernelCompileError, match=r"combine\.cu\(\d+\): error"):
        check_nvrtc(text, "combine.cu", "compute_90")


@needs_nvcc
def test_broken_kernel_fails_nvcc(tmp_path):
    p = tmp_path / "rawconv.cu"
    p.write_text(_broken_copy())
    with pytest.raises(KernelCompileError, match='identifier "black" is undefined'):
        nvrtc.compile_nvcc_ptx(p, "compute_75")


@pytest.mark.parametrize("snippet, problem", [
    ('__global__ void k(float* x, long long n) { x[gridDim.x] = 0; }', 'without extern "C"'),
    ('extern "C" __global__ void k(float* x) { x[0] = __shfl_sync(0xffffffff, x[1], 0); }', "warp intrinsic"),
    ('extern "C" __global__ void k(float* x) { __shared__ float t[32]; x[gridDim.x] = t[0]; }', "shared memory"),
    ('extern "C" __global__ void k(float* x) { __syncthreads(); x[gridDim.x] = 0; }', "__syncthreads"),
    ('#include <cstdint>\nextern "C" __global__ void k(float* x) { x[gridDim.x] = 0; }', "#include"),
    ('extern "C" __global__ void k(float* x) { x[threadIdx.x] = 0; }', "no grid-stride loop"),
])
def test_lint_catches_rule_breaks(snippet, problem):
    assert any(problem in p for p in lint(snippet)), lint(snippet)


def test_lint_ignores_comments():
    assert lint('// __syncthreads() is not allowed\nextern "C" __global__ void k(float* x, long long n)'
                ' { for (long long i = 0; i < n; i += gridDim.x) x[i] = 0; }') == []


# ----------------------------------------------------------------------------- the tool itself


@needs_nvrtc
def test_nvrtc_version_and_options():
    assert nvrtc.nvrtc_version() >= (12, 0)
    opts = nvrtc.compile_options("compute_90", ("A=1",))
    assert opts[0] == "-DA=1" and "--fmad=false" in opts and opts[-1] == "--gpu-architecture=compute_90"


def test_nvrtc_library_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SKYSTACK_NVRTC", str(tmp_path / "libnvrtc.so.missing"))
    nvrtc._load.cache_clear()
    try:
        assert not nvrtc.nvrtc_available()
        with pytest.raises(KernelCompileError, match="NVRTC is not available"):
            nvrtc.compile_ptx("", name="x.cu")
    finally:
        monkeypatch.undo()
        nvrtc._load.cache_clear()


def test_nvcc_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(KernelCompileError, match="nvcc is not on PATH"):
        nvrtc.compile_nvcc_ptx(Path(KERNEL_DIR / "rawconv.cu"))


def _strip_reference(text: str) -> str:
    """A character scanner: literals kept whole (backslash escapes skipped), each comment character but
    its line breaks made a space; an unterminated literal or comment runs to the end."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def test_strip_comments_keeps_literals_and_line_breaks():
    import random

    rng = random.Random(7)
    pieces = ["/", "*", '"', "'", "\\", "\n", "a", " ", "//", "/*", "*/"]
    texts = [read_source(s) for s in SOURCES]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(5000)]
    for t in texts:
        assert strip_comments(t) == _strip_reference(t), repr(t)
    assert strip_comments('a /* x\ny */ "/*s*/" // z\nb') == 'a     \n     "/*s*/"     \nb'
