"""tools/benchmark.py's parts: gain (AP over seeds), overhead (step time/memory), kernels (losses).

Every part covers automatically the distillers registered when it runs.
"""
