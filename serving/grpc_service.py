"""TF Serving's gRPC API on the servicers tensorflow-serving-api ships.

tensorflow.serving.PredictionService: Predict, Classify, Regress,
MultiInference, GetModelMetadata; tensorflow.serving.ModelService:
GetModelStatus, HandleReloadConfigRequest. Requests become the ModelServer's
protocol-neutral calls (as REST's do, in serving/rest.py), and status and
metadata answers come from serving/status.py, which REST shares, so the two
protocols validate and answer alike.
"""

import concurrent.futures
import logging

import grpc
from tensorflow_serving.apis import classification_pb2
from tensorflow_serving.apis import inference_pb2
from tensorflow_serving.apis import model_management_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.apis import regression_pb2

from pipeline import signatures
from serving import codec
from serving.errors import ServingError, invalid
from serving.status import fill_spec, metadata_response, status_response
from serving.versions import model_configs

log = logging.getLogger('estpipe')


def start(core):
  """Opens the gRPC front end of `core` (a ModelServer) on the port its
  options name; None if they name none."""
  opts = core.options
  if opts.grpc_port is None:
    return None
  server = grpc.server(
      concurrent.futures.ThreadPoolExecutor(max_workers=opts.grpc_max_workers,
                                            thread_name_prefix='grpc'),
      options=[('grpc.max_receive_message_length', opts.max_body_bytes),
               ('grpc.max_send_message_length', -1),
               ('grpc.so_reuseport', 0)])
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
      PredictionService(core), server)
  model_service_pb2_grpc.add_ModelServiceServicer_to_server(
      ModelService(core), server)
  bound = server.add_insecure_port(f'{_host(opts.host)}:{opts.grpc_port}')
  if not bound:
    raise OSError(f'cannot listen for gRPC on {opts.host}:{opts.grpc_port}')
  server.start()
  log.info('gRPC API at %s:%d', opts.host, bound)
  return _FrontEnd(server, bound)


class _FrontEnd:
  """The gRPC server as the ModelServer drives its front ends."""
  name = 'grpc'

  def __init__(self, server, port):
    self.server = server
    self.port = port
    self._stopped = None

  def shutdown(self, grace):
    """Refuses new RPCs; in-flight ones get `grace` seconds."""
    self._stopped = self.server.stop(grace)

  def close(self, grace):
    self._stopped.wait(grace)


def _host(host):
  return f'[{host}]' if ':' in host and not host.startswith('[') else host


def _rpc(method):
  """Runs an RPC as an in-flight request; ServingError -> gRPC status."""
  def wrapper(self, request, context):
    with self.core.request():
      try:
        return method(self, request, context)
      except ServingError as e:
        context.abort(e.code, e.message)
      except Exception as e:  # pylint: disable=broad-except
        log.exception('gRPC %s failed', method.__name__)
        context.abort(grpc.StatusCode.INTERNAL, f'Internal error: {e}')
  wrapper.__name__ = method.__name__
  return wrapper


def resolve_spec(core, model_spec):
  """The ServableVersion a request's ModelSpec names."""
  if not model_spec.name:
    raise invalid('model_spec.name is required')
  version = model_spec.version.value if model_spec.HasField('version') else None
  label = model_spec.version_label or None
  return core.resolve(model_spec.name, version, label)


def serialized_examples(input_proto, kinds=None):
  """Serialized tf.Examples of a tensorflow.serving.Input.

  With `kinds` (an estpipe export's raw feature kinds) the Examples are
  retyped first, as REST does for JSON values (codec.coerce_example).
  """
  kind = input_proto.WhichOneof('kind')
  if kind == 'example_list':
    examples = input_proto.example_list.examples
    _coerce(examples, kinds, 'example_list')
    return [e.SerializeToString() for e in examples]
  if kind == 'example_list_with_context':
    data = input_proto.example_list_with_context
    _coerce(data.examples, kinds, 'example_list_with_context')
    if kinds:
      codec.coerce_example(data.context, kinds,
                           'example_list_with_context.context')
    # Protobuf merge semantics: an example's features win over the context's.
    context = data.context.SerializeToString()
    return [context + e.SerializeToString() for e in data.examples]
  raise invalid('Input is empty: set example_list or '
                'example_list_with_context')


def _coerce(examples, kinds, where):
  if kinds:
    for i, example in enumerate(examples):
      codec.coerce_example(example, kinds, f'{where}.examples[{i}]')


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
  """tensorflow.serving.PredictionService."""

  def __init__(self, core):
    self.core = core

  @_rpc
  def Predict(self, request, context):  # pylint: disable=invalid-name
    servable = resolve_spec(self.core, request.model_spec)
    signature = servable.signature(request.model_spec.signature_name)
    inputs = {name: codec.proto_to_array(proto, name)
              for name, proto in request.inputs.items()}
    outputs = self.core.predict(signature, inputs,
                                list(request.output_filter))
    response = predict_pb2.PredictResponse()
    fill_spec(response.model_spec, servable, signature.key)
    for name, value in outputs.items():
      response.outputs[name].CopyFrom(codec.array_to_proto(value))
    return response

  @_rpc
  def Classify(self, request, context):  # pylint: disable=invalid-name
    servable = resolve_spec(self.core, request.model_spec)
    signature = servable.signature(request.model_spec.signature_name)
    results = self.core.classify(signature, serialized_examples(
        request.input, servable.raw_features))
    response = classification_pb2.ClassificationResponse()
    fill_spec(response.model_spec, servable, signature.key)
    _fill_classifications(response.result, results)
    return response

  @_rpc
  def Regress(self, request, context):  # pylint: disable=invalid-name
    servable = resolve_spec(self.core, request.model_spec)
    signature = servable.signature(request.model_spec.signature_name)
    values = self.core.regress(signature, serialized_examples(
        request.input, servable.raw_features))
    response = regression_pb2.RegressionResponse()
    fill_spec(response.model_spec, servable, signature.key)
    _fill_regressions(response.result, values)
    return response

  @_rpc
  def MultiInference(self, request, context):  # pylint: disable=invalid-name
    """Classification and regression tasks of one model over one input.

    Validated as TF Serving does (multi_inference.cc): one model, each
    signature once, classify or regress methods, one shared input tensor;
    each task's signature then runs on the same Examples.
    """
    tasks = list(request.tasks)
    if not tasks:
      raise invalid('MultiInferenceRequest has no tasks: give at least one '
                    'classification or regression task')
    servable = resolve_spec(self.core, tasks[0].model_spec)
    plan = []
    seen = set()
    input_tensor = None
    for task in tasks:
      spec = task.model_spec
      if not spec.name:
        raise invalid('Found ModelSpec with an empty model name.')
      if spec.name != tasks[0].model_spec.name:
        raise invalid('All ModelSpecs in a MultiInferenceRequest must access '
                      'the same model name.')
      key = spec.signature_name or signatures.DEFAULT_SIGNATURE
      if key in seen:
        raise invalid(f'Duplicate evaluation of signature: {key}')
      seen.add(key)
      signature = servable.signatures.get(key)
      if signature is None:
        raise invalid(f'Requested signature not found in model graph: {key}')
      if task.method_name not in (signatures.CLASSIFY_METHOD,
                                   signatures.REGRESS_METHOD):
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           'Unsupported signature method_name: '
                           f'{task.method_name}')
      inputs = servable.signature_defs[key].inputs
      names = sorted(info.name for info in inputs.values())
      if input_tensor is None:
        input_tensor = names
      elif names != input_tensor:
        raise invalid('Input tensor must be the same for all Signatures.')
      plan.append((task.method_name, signature))
    serialized = serialized_examples(request.input, servable.raw_features)
    calls = [(method, (self.core.classify_call if
                       method == signatures.CLASSIFY_METHOD else
                       self.core.regress_call)(signature, serialized))
             for method, signature in plan]
    response = inference_pb2.MultiInferenceResponse()
    for method, call in calls:
      result = response.results.add()
      fill_spec(result.model_spec, servable, call.signature.key)
      if method == signatures.CLASSIFY_METHOD:
        _fill_classifications(result.classification_result, call.run())
      else:
        _fill_regressions(result.regression_result, call.run())
    return response

  @_rpc
  def GetModelMetadata(self, request, context):  # pylint: disable=invalid-name
    unsupported = [f for f in request.metadata_field if f != 'signature_def']
    if unsupported or not request.metadata_field:
      raise invalid('metadata_field must be ["signature_def"], got '
                    f'{list(request.metadata_field)}')
    servable = resolve_spec(self.core, request.model_spec)
    return metadata_response(servable)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
  """tensorflow.serving.ModelService."""

  def __init__(self, core):
    self.core = core

  @_rpc
  def GetModelStatus(self, request, context):  # pylint: disable=invalid-name
    spec = request.model_spec
    if not spec.name:
      raise invalid('model_spec.name is required')
    version = spec.version.value if spec.HasField('version') else None
    return status_response(self.core, spec.name, version,
                           spec.version_label or None)

  @_rpc
  def HandleReloadConfigRequest(self, request, context):  # pylint: disable=invalid-name
    """Serves the request's model list from now on (as TF Serving: added
    models are loaded before the answer, removed ones unloaded)."""
    if request.config.WhichOneof('config') != 'model_config_list':
      raise invalid('ServerModelConfig type not supported by '
                    'HandleReloadConfigRequest. Only ModelConfigList is '
                    'currently supported')
    try:
      models = model_configs(request.config, 'ReloadConfigRequest.config')
    except ValueError as e:
      raise invalid(str(e)) from None
    self.core.reload_config(models)
    response = model_management_pb2.ReloadConfigResponse()
    response.status.SetInParent()  # error_code 0: OK
    return response


def _fill_classifications(result, results):
  """A ClassificationResult from classify's [[(label, score)]]."""
  for row in results:
    classifications = result.classifications.add()
    for label, score in row:
      classifications.classes.add(label=codec.label_text(label),
                                  score=score)


def _fill_regressions(result, values):
  for value in values:
    result.regressions.add(value=value)
