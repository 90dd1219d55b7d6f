"""Sampling throughput vs batch size and length; the benchmark lives in the package.

python benchmarks/bench_sample.py [options]   # the same as: griffon bench sample [options]
"""

import argparse

from griffon.bench import sampling

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=sampling.__doc__)
    sampling.add_arguments(parser)
    sampling.run(parser.parse_args())
