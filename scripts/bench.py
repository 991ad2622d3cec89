"""kd-lab's epoch against a hand-written PyTorch loop (the same as ``kd-lab-bench``; see kd_lab/tools/bench.py).

OMP_NUM_THREADS=1 python scripts/bench.py --out bench.json
"""

from kd_lab.tools.bench import main

if __name__ == "__main__":
    main()
