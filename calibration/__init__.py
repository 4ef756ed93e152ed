"""INT8 for exported artifacts: calibration data, quantization, accuracy gate.

    dataset.py      calibration data sets (image folder + prompts.jsonl, or the
                    synthetic scene world), seeded selection, content hash
    folder.py       listing a calibration folder; prompts.jsonl
    feeds.py        graph inputs from the fp32 artifact running real pairs
    ranges.py       onnxruntime calibrators; the activation-range cache
    graphs.py       QDQ static / dynamic quantization of a graph; int8 embedding
    gate.py         accuracy figures against fp32 on the held-out split
    sensitivity.py  per-node sensitivity and the exclusion loop
    report.py       manifest section, calibration_report.json / .md
    int8.py         the whole step on an fp32 artifact directory

`vlm-export --precision int8|int8-dynamic` runs it (export/exporter.py).
Imports the runtime, onnx and onnxruntime; never torch.
"""
