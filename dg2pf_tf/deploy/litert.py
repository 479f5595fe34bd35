"""LiteRT (.tflite) files: read and write them, index their operators, run them.

No Keras here. Files are read and written with `ai_edge_litert.tools.flatbuffer_utils`
(the object tree of `ai_edge_litert.schema_py_generated`, which names every
operator, tensor type and option); the sparse weights inside are the business of
`sparse_tensors`, the padding rewrite of `padding`.
"""

import dataclasses

import numpy as np

try:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils
except ImportError:  # ai-edge-litert is needed for LiteRT work only
    schema = flatbuffer_utils = None


def require_litert():
    """Raises ImportError with the fix when ai-edge-litert is not installed."""
    if schema is None:
        raise ImportError(
            "LiteRT export needs the `ai-edge-litert` package (the LiteRT "
            "interpreter and flatbuffer schema): pip install ai-edge-litert"
        )


def read(content):
    """The object tree (`schema.ModelT`) of a .tflite file's bytes."""
    require_litert()
    # Not read_model_from_bytearray: it also merges the converter's empty
    # buffers, which would change the sizes `export` reports against dense.
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(content))


def write(model):
    """The bytes of a `schema.ModelT`."""
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def numpy_dtype(tensor_type):
    """The numpy dtype of a schema `TensorType`; raises TypeError for one numpy
    lacks (STRING, INT4, BFLOAT16...)."""
    # The schema's type names are numpy's dtype names in capitals.
    return np.dtype(flatbuffer_utils.type_to_name(tensor_type).lower())


def stores_int8(model):
    """Whether `schema.ModelT` `model` holds any constant (a tensor with data) of type INT8."""
    return any(t.type == schema.TensorType.INT8 and model.buffers[t.buffer].data is not None
               and len(model.buffers[t.buffer].data) > 0
               for subgraph in model.subgraphs for t in subgraph.tensors)


def is_float(tensor_type):
    """Whether a schema `TensorType` is a float type the sparse path computes in."""
    return tensor_type in (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16)


@dataclasses.dataclass(frozen=True)
class OperatorIndex:
    """One subgraph as read: its operators, their builtin codes and names, the
    operator producing each tensor and the ones reading it (positions in
    `operators`). Rewrites keep the operator objects it lists."""

    model: object
    subgraph: int
    graph: object
    operators: list
    codes: list
    names: list
    producer: dict
    consumers: dict

    @classmethod
    def of(cls, model, subgraph=0):
        """The index of `model.subgraphs[subgraph]`."""
        graph = model.subgraphs[subgraph]
        operators = list(graph.operators)
        codes = [flatbuffer_utils.get_builtin_code_from_operator_code(
            model.operatorCodes[op.opcodeIndex]) for op in operators]
        names = [flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) or f"OP_{code}"
                 for op, code in zip(operators, codes)]
        producer, consumers = {}, {}
        for n, op in enumerate(operators):
            producer.update((int(t), n) for t in op.outputs)
            # -1 marks an optional input left out.
            for t in dict.fromkeys(int(t) for t in op.inputs if t >= 0):
                consumers.setdefault(t, []).append(n)
        return cls(model, subgraph, graph, operators, codes, names, producer, consumers)

    def tensor(self, index):
        return self.graph.tensors[int(index)]

    def shape(self, index):
        return [int(d) for d in self.tensor(index).shape]

    def readers(self, index, code=None):
        """Positions of the operators reading tensor `index` (only those of builtin `code`)."""
        return [n for n in self.consumers.get(int(index), []) if code is None or self.codes[n] == code]


def indexes(model):
    """An `OperatorIndex` for every subgraph of `model`."""
    return [OperatorIndex.of(model, g) for g in range(len(model.subgraphs))]


def interpreter(content, num_threads=None):
    """A LiteRT interpreter with its default delegates (XNNPACK on CPU), allocated.

    Raises RuntimeError with the runtime's message when it refuses the file.
    """
    require_litert()
    from ai_edge_litert.interpreter import Interpreter

    try:
        runner = Interpreter(model_content=bytes(content), num_threads=num_threads)
        runner.allocate_tensors()
    except (RuntimeError, ValueError) as error:
        raise RuntimeError(str(error).strip()) from None
    return runner


def predict(content, inputs, runner=None):
    """Runs a single-input, single-output file on `inputs` (a batch); returns outputs."""
    runner = runner or interpreter(content)
    detail = runner.get_input_details()[0]
    inputs = np.asarray(inputs)
    if tuple(detail["shape"]) != inputs.shape:
        runner.resize_tensor_input(detail["index"], inputs.shape)
        runner.allocate_tensors()
        detail = runner.get_input_details()[0]
    scale, zero = detail["quantization"]
    if detail["dtype"] != np.float32 and scale:
        inputs = np.round(inputs / scale + zero)
    runner.set_tensor(detail["index"], inputs.astype(detail["dtype"]))
    runner.invoke()
    out = runner.get_output_details()[0]
    result = runner.get_tensor(out["index"])
    scale, zero = out["quantization"]
    if out["dtype"] != np.float32 and scale:
        result = (result.astype(np.float32) - zero) * scale
    return result
