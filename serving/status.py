"""Model status and metadata answers, shared by the REST and gRPC front ends.

As TF Serving's handlers share GetModelStatusImpl and GetModelMetadataImpl,
both front ends build these answers here: as protos for gRPC, and the same
protos rendered as JSON for REST, so the two protocols always agree.
"""

from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2

from serving.versions import END

_STATE = get_model_status_pb2.ModelVersionStatus.State


def fill_spec(spec, servable, signature_key=None):
  """A response's ModelSpec: the model and version that answered."""
  spec.name = servable.name
  spec.version.value = servable.version
  if signature_key is not None:
    spec.signature_name = signature_key


def metadata_response(servable):
  response = get_model_metadata_pb2.GetModelMetadataResponse()
  fill_spec(response.model_spec, servable)
  signatures = get_model_metadata_pb2.SignatureDefMap()
  for key, signature_def in servable.signature_defs.items():
    signatures.signature_def[key].CopyFrom(signature_def)
  response.metadata['signature_def'].Pack(signatures)
  return response


def status_response(core, name, version=None, label=None):
  response = get_model_status_pb2.GetModelStatusResponse()
  for number, status in core.statuses(name, version, label):
    entry = response.model_version_status.add(
        version=number, state=_STATE.Value(status.state))
    entry.status.SetInParent()  # TF Serving always reports a status
    if status.state == END and status.error:
      entry.status.error_code = 2  # UNKNOWN: the load failed
      entry.status.error_message = status.error
  return response


def _to_dict(message):
  try:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True,
        including_default_value_fields=True)
  except TypeError:  # protobuf >= 5 renamed the flag
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True)


def status_json(core, name, version=None, label=None):
  return _to_dict(status_response(core, name, version, label))


def metadata_json(servable):
  """TF Serving's REST metadata: model_spec plus the SignatureDefMap."""
  response = metadata_response(servable)
  signatures = get_model_metadata_pb2.SignatureDefMap()
  response.metadata['signature_def'].Unpack(signatures)
  return {'model_spec': _to_dict(response.model_spec),
          'metadata': {'signature_def': json_format.MessageToDict(
              signatures, preserving_proto_field_name=True)}}
