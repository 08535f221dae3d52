"""A client of Beam's job API (beam_job_api.proto), for `estpipe jobs`.

Every Beam job service speaks it: the Python local job service, Flink's and
Spark's job servers. Listing, state, messages and cancelling go through
Beam's own JobServiceStub; estpipe adds two things. It fails in seconds, with
the address, where nothing answers (gRPC would wait much longer), and
cancelling also marks the job's staging folder, so that a job which goes on
running anyway (Beam's Python job service only marks a job CANCELLED) still
publishes nothing (preprocessing/publish.py).
"""

import socket

import grpc
from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.portability.api import beam_job_api_pb2_grpc

from pipeline import fs
from pipeline.errors import UserError
from pipeline.rundir import RunDir

CONNECT_SECONDS = 5
CALL_SECONDS = 30
# The pipeline option that carries a job's staging folder (runners.py sets
# it), as the job API spells options.
STAGING_KEY = 'beam:option:estpipe_staging:v1'


def check_answers(address, what):
  """Raises UserError unless a gRPC server answers at `address` within
  seconds; `what` says which flag gave the address."""
  _check_listening(address, what)
  channel = grpc.insecure_channel(address)
  try:
    _wait_ready(channel, address, what)
  finally:
    channel.close()


def _check_listening(address, what):
  # A refused connection fails at once here; gRPC would retry it until
  # the timeout.
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise UserError(f'{what}={address}: expected HOST:PORT')
  try:
    socket.create_connection((host.strip('[]'), int(port)),
                             timeout=CONNECT_SECONDS).close()
  except OSError as e:
    raise UserError(f'nothing answers at {address} ({what}): '
                    f'{e.strerror or e}') from None


def _wait_ready(channel, address, what):
  try:
    grpc.channel_ready_future(channel).result(timeout=CONNECT_SECONDS)
  except grpc.FutureTimeoutError:
    raise UserError(f'nothing answers at {address} ({what}) within '
                    f'{CONNECT_SECONDS} s: is the service running?') from None


def state_name(state):
  return beam_job_api_pb2.JobState.Enum.Name(state)


class JobService:
  """The job service at `endpoint` (HOST:PORT)."""

  def __init__(self, endpoint):
    self.endpoint = endpoint
    _check_listening(endpoint, '--job_endpoint')
    self._channel = grpc.insecure_channel(endpoint)
    _wait_ready(self._channel, endpoint, '--job_endpoint')
    self._stub = beam_job_api_pb2_grpc.JobServiceStub(self._channel)

  def close(self):
    self._channel.close()

  def _call(self, method, request, **kwargs):
    try:
      return method(request, **kwargs)
    except grpc.RpcError as e:
      raise self._error(e) from None

  def _error(self, rpc_error):
    return UserError(f'job service at {self.endpoint}: '
                     f'{rpc_error.details()}')

  def jobs(self):
    """[JobInfo] of every job the service knows."""
    return list(self._call(self._stub.GetJobs,
                           beam_job_api_pb2.GetJobsRequest(),
                           timeout=CALL_SECONDS).job_info)

  def state(self, job_id):
    return state_name(self._call(
        self._stub.GetState,
        beam_job_api_pb2.GetJobStateRequest(job_id=job_id),
        timeout=CALL_SECONDS).state)

  def messages(self, job_id):
    """The job's messages and state changes as lines, until it ends."""
    stream = self._stub.GetMessageStream(
        beam_job_api_pb2.JobMessagesRequest(job_id=job_id))
    try:
      for response in stream:
        yield _message_line(response)
    except grpc.RpcError as e:
      raise self._error(e) from None

  def cancel(self, job_id):
    """Cancels the job and marks its staging folder; returns the state."""
    staging = self._staging_of(job_id)
    state = state_name(self._call(
        self._stub.Cancel, beam_job_api_pb2.CancelJobRequest(job_id=job_id),
        timeout=CALL_SECONDS).state)
    if staging and fs.exists(staging):
      with fs.open_file(RunDir(staging).cancel_marker, 'w') as f:
        f.write(job_id + '\n')
    return state

  def _staging_of(self, job_id):
    for info in self.jobs():
      if info.job_id == job_id:
        return staging_of(info)
    raise UserError(f'job service at {self.endpoint} has no job {job_id}')


def staging_of(info):
  """The staging folder of an estpipe job (a JobInfo), else None."""
  value = info.pipeline_options.fields.get(STAGING_KEY)
  return value.string_value if value else None


def _message_line(response):
  if response.HasField('state_response'):
    return f'state: {state_name(response.state_response.state)}'
  message = response.message_response
  importance = beam_job_api_pb2.JobMessage.MessageImportance.Name(
      message.importance).replace('JOB_MESSAGE_', '')
  return f'{message.time} {importance} {message.message_text}'
