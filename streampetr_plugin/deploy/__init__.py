"""Deployment: a trained detector as an ONNX graph of one streaming frame, run with onnxruntime.

* :mod:`~streampetr_plugin.deploy.graph` - the frame module and the graph's inputs and outputs;
* :mod:`~streampetr_plugin.deploy.export` - ``streampetr export``;
* :mod:`~streampetr_plugin.deploy.onnx_runner` - the onnxruntime runner that carries the memory;
* :mod:`~streampetr_plugin.deploy.parity` - onnxruntime against the PyTorch eval path;
* :mod:`~streampetr_plugin.deploy.infer` - ``streampetr infer``.

``onnx`` and ``onnxruntime`` come with the ``deploy`` extra: ``pip install 'streampetr-plugin[deploy]'``.
"""
