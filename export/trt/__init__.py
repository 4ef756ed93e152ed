"""TensorRT target: what `vlm-export --target trt` adds to an artifact.

Host side (no TensorRT needed):
    profiles.py   optimization-profile plan per component (--max-context/-batch/-images)
    ops_table.py  TensorRT's supported ONNX operators, with the constraints that matter
    compat.py     static check of every node against that table (`vlm-export check-trt`)
    trtexec.py    the exact trtexec command per component (build_engines.sh)
    prepare.py    ties them into the export (manifest `trt` section)

Device side (needs TensorRT; imported lazily):
    build.py      `vlm-export build-engines`: TensorRT builder API, timing cache, manifest update
"""
