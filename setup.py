from setuptools import find_packages, setup

setup(
    name="csgr_distill",
    version="0.1.0",
    description="Knowledge distillation for Detectron2 detectors: CSGR and peer methods",
    package_dir={"csgr_distill": "projects/csgr_distill"},
    packages=["csgr_distill"]
    + ["csgr_distill." + p for p in find_packages("projects/csgr_distill")],
    python_requires=">=3.10",
)
