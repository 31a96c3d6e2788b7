"""The repository's GPU tests in parts, for sessions whose device budget cannot run them whole (~400 tests, ~35-40 min
on an H100, session 45): ``python3 bench/gpu_parts.py I N`` prints the test files of part I of N (1-based), the files
dealt greedily by their GPU test count so the parts are about even; ``bash bench/gpu.sh gpupart`` runs PART=I/N.
Usage: python3 bench/gpu_parts.py 1 4"""
import collections
import subprocess
import sys


def parts(n: int) -> list[list[str]]:
    """The files holding GPU tests, dealt into ``n`` parts of about equal test counts (largest first)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests"],
                         capture_output=True, text=True).stdout
    counts = collections.Counter(line.split("::")[0] for line in out.splitlines() if "::" in line)
    bins = [[0, []] for _ in range(n)]
    for path, count in sorted(counts.items(), key=lambda pc: (-pc[1], pc[0])):
        b = min(bins, key=lambda b: b[0])
        b[0] += count
        b[1].append(path)
    return [sorted(files) for _, files in bins]


if __name__ == "__main__":
    if len(sys.argv) != 3 or not all(a.isdigit() for a in sys.argv[1:]) or not 1 <= int(sys.argv[1]) <= int(sys.argv[2]):
        sys.exit(__doc__.splitlines()[-1] + "   (part I of N, 1 <= I <= N)")
    files = parts(int(sys.argv[2]))[int(sys.argv[1]) - 1]
    if not files:  # (collection failed or N exceeds the files: an empty list would make pytest run every test)
        sys.exit(f"gpu_parts: part {sys.argv[1]} of {sys.argv[2]} holds no test file (pytest --collect-only -m gpu tests)")
    print(" ".join(files))
