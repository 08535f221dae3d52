"""`estpipe` subcommands of the serving package.

Each command is one `_add_<name>(subparsers)` function listed in _COMMANDS;
heavy imports (TensorFlow, gRPC) happen when a command runs, so `estpipe
--help` stays fast.
"""

import argparse
import json
import logging
import os

from pipeline import args as args_lib
from pipeline import errors
from pipeline import quiet
from pipeline.errors import UserError

log = logging.getLogger('estpipe')


def register(subparsers):
  for add in _COMMANDS:
    add(subparsers)


def _bool(text):
  """TF Serving style booleans: --flag, --flag=true, --flag=false."""
  value = text.strip().lower()
  if value in ('true', '1', 'yes'):
    return True
  if value in ('false', '0', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


def _add_serve(subparsers):
  parser = subparsers.add_parser(
      'serve', help='serve SavedModels over TF Serving\'s REST and gRPC APIs',
      description='A drop-in for tensorflow_model_server: same flags, same '
      'REST and gRPC APIs. Polls the base path, loading new versions and '
      'unloading removed ones without failing requests.')
  parser.add_argument('--port', type=int, default=8500,
                      help='gRPC port (default 8500; 0 picks a free port)')
  parser.add_argument('--rest_api_port', type=int, default=8501,
                      help='REST port (default 8501; 0 disables REST)')
  parser.add_argument('--host', default='127.0.0.1',
                      help='interface to listen on (default 127.0.0.1; '
                      '0.0.0.0 for all)')
  parser.add_argument('--rest_api_host', default=None,
                      help='interface for REST if different from --host')
  parser.add_argument('--model_name', default='default',
                      help='name of the model (with --model_base_path)')
  parser.add_argument('--model_base_path', default=None,
                      help='folder holding integer-named SavedModel versions')
  parser.add_argument('--model_config_file', default=None,
                      help='TF Serving ModelServerConfig in text format '
                      '(several models, version policies and labels)')
  parser.add_argument('--model_config_file_poll_wait_seconds', type=float,
                      default=0, help='seconds between re-reads of '
                      '--model_config_file; a changed file is applied '
                      '(models added, removed, policies and labels changed), '
                      'a bad one logged and ignored (default 0: read once)')
  parser.add_argument('--enable_batching', type=_bool, nargs='?', const=True,
                      default=False, help='merge concurrent requests into '
                      'batched signature calls')
  parser.add_argument('--batching_parameters_file', default=None,
                      help='TF Serving BatchingParameters in text format, '
                      'e.g. "max_batch_size { value: 32 } '
                      'batch_timeout_micros { value: 1000 }"')
  parser.add_argument('--file_system_poll_wait_seconds', type=float,
                      default=1, help='seconds between polls of the base '
                      'paths (default 1; 0: load once at start, no polling)')
  parser.add_argument('--max_request_bytes', type=int, default=64 << 20,
                      help='largest request body (REST) or message (gRPC) '
                      'accepted (default 64 MiB)')
  parser.add_argument('--tensorflow_intra_op_parallelism', type=int,
                      default=0, help='threads for one op (0: TensorFlow '
                      'picks); 1 suits tiny models on small machines')
  parser.add_argument('--tensorflow_inter_op_parallelism', type=int,
                      default=0, help='ops run in parallel (0: TensorFlow '
                      'picks)')
  parser.add_argument('--grpc_max_threads', type=int, default=32,
                      help='gRPC worker threads (default 32)')
  # REST connection limits (not TF Serving flags).
  parser.add_argument('--header_timeout_seconds', type=float, default=10,
                      help='REST: seconds for a request head to arrive, '
                      'else 408 (default 10; 0: no limit)')
  parser.add_argument('--body_timeout_seconds', type=float, default=30,
                      help='REST: most seconds between reads of a request '
                      'body, else 408 (default 30; 0: no limit)')
  parser.add_argument('--idle_timeout_seconds', type=float, default=30,
                      help='REST: seconds before an idle keep-alive '
                      'connection is closed (default 30; 0: never)')
  parser.add_argument('--max_connections', type=int, default=None,
                      help='REST: most open connections; more are answered '
                      '503 (default: from the open-file limit, at most '
                      '4096; 0: no limit)')
  parser.add_argument('--enable_model_warmup', type=_bool, nargs='?',
                      const=True, default=True, help='replay a version\'s '
                      'assets.extra/tf_serving_warmup_requests before serving '
                      'it (default true)')
  parser.add_argument('--load_retry_interval_micros', type=int,
                      default=1_000_000, help='first retry of a version that '
                      'failed to load, doubling up to 5 minutes (and at once '
                      'when its files change; default 1 s)')
  parser.set_defaults(func=_serve)


def serve_options(args):
  """ServerOptions from parsed `serve` flags; UserError on bad flags."""
  # pylint: disable-next=g-import-not-at-top
  from serving import batching, server, versions
  models = _model_configs(args, versions)
  for model in models:
    if not os.path.isdir(model.base_path):
      raise UserError(f'model {model.name}: base path {model.base_path} does '
                      'not exist')
  if args.file_system_poll_wait_seconds < 0:
    # TF Serving's "never poll" testing mode would load nothing at all.
    raise UserError('--file_system_poll_wait_seconds must be >= 0 (0 loads '
                    'the versions present at start and never polls)')
  if args.model_config_file_poll_wait_seconds < 0:
    raise UserError('--model_config_file_poll_wait_seconds must be >= 0 (0 '
                    'reads the file once, at start)')
  if (args.model_config_file_poll_wait_seconds and
      not args.model_config_file):
    raise UserError('--model_config_file_poll_wait_seconds needs '
                    '--model_config_file')
  if args.max_request_bytes < 1:
    raise UserError('--max_request_bytes must be positive')
  if args.grpc_max_threads < 1:
    raise UserError('--grpc_max_threads must be positive')
  for name in ('header_timeout_seconds', 'body_timeout_seconds',
               'idle_timeout_seconds', 'max_connections'):
    if (getattr(args, name) or 0) < 0:
      raise UserError(f'--{name} must be >= 0 (0: no limit)')
  if args.load_retry_interval_micros < 1:
    raise UserError('--load_retry_interval_micros must be positive')
  return server.ServerOptions(
      models=models, grpc_port=args.port,
      rest_port=args.rest_api_port or None, host=args.host,
      rest_host=args.rest_api_host,
      poll_wait_seconds=args.file_system_poll_wait_seconds,
      model_config_file=args.model_config_file,
      model_config_poll_seconds=args.model_config_file_poll_wait_seconds,
      batching=_batching_options(args, batching),
      max_body_bytes=args.max_request_bytes,
      grpc_max_workers=args.grpc_max_threads,
      header_timeout_seconds=args.header_timeout_seconds,
      body_timeout_seconds=args.body_timeout_seconds,
      idle_timeout_seconds=args.idle_timeout_seconds,
      max_connections=args.max_connections,
      model_warmup=args.enable_model_warmup,
      load_retry_seconds=args.load_retry_interval_micros / 1e6)


def _model_configs(args, versions):
  if args.model_config_file and args.model_base_path:
    raise UserError('give either --model_config_file or --model_base_path, '
                    'not both')
  if args.model_config_file:
    try:
      with open(args.model_config_file) as f:
        text = f.read()
    except OSError as e:
      raise UserError(f'cannot read --model_config_file: {e}') from None
    try:
      return versions.parse_model_config_text(text, args.model_config_file)
    except ValueError as e:
      raise UserError(str(e)) from None
  if not args.model_base_path:
    raise UserError('give --model_base_path (with --model_name) or '
                    '--model_config_file')
  return [versions.ModelConfig(name=args.model_name,
                               base_path=os.path.abspath(args.model_base_path))]


def _batching_options(args, batching):
  if not args.enable_batching:
    if args.batching_parameters_file:
      raise UserError('--batching_parameters_file needs --enable_batching')
    return None
  if not args.batching_parameters_file:
    return batching.BatchingOptions()
  try:
    with open(args.batching_parameters_file) as f:
      return batching.parse_batching_parameters(f.read())
  except OSError as e:
    raise UserError(f'cannot read --batching_parameters_file: {e}') from None
  except Exception as e:  # text_format.ParseError or a bad value
    raise UserError(f'{args.batching_parameters_file}: {e}') from None


def _serve(args):
  # pylint: disable-next=g-import-not-at-top
  from serving import grpc_service, rest, server
  # A server's log is its record of loads, swaps and shutdown: keep INFO
  # even where the root logger is quieter.
  if log.level == logging.NOTSET:
    log.setLevel(logging.INFO)
  options = serve_options(args)
  ports = _ports(options)
  for what, host, port in ports:
    _check_port_free(what, host, port)  # before loading any model
  _set_tensorflow_threads(args)
  try:
    server.serve_until_signal(server.ModelServer(
        options, front_ends=(grpc_service.start, rest.start)))
  except (OSError, RuntimeError) as e:
    # Taken between the check and the bind: grpcio raises RuntimeError
    # ('Failed to bind to address'), asyncio OSError (EADDRINUSE).
    raise UserError(_bind_error(e, ports)) from None
  return 0


def _ports(options):
  """(front end, host, port) of every port the server will bind."""
  ports = [('gRPC', options.host, options.grpc_port)]
  if options.rest_port:
    ports.append(('REST', options.rest_host or options.host,
                  options.rest_port))
  return ports


def _check_port_free(what, host, port):
  """UserError naming the port when it cannot be bound (in use, bad host)."""
  import errno  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  if not port:
    return  # 0: a free one is picked
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
  except socket.gaierror as e:
    raise UserError(f'cannot start the server: {what} host {host!r}: '
                    f'{e.strerror}') from None
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as probe:
    # As the servers do: a port only in TIME_WAIT is free.
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind(address)
    except OSError as e:
      why = ('is already in use' if e.errno == errno.EADDRINUSE else
             f'cannot be bound: {e.strerror}')
      flag = '--port' if what == 'gRPC' else '--rest_api_port'
      raise UserError(f'cannot start the server: {what} port {port} on '
                      f'{host} {why} (choose another with {flag})') from None


def _bind_error(error, ports):
  text = str(error)
  if isinstance(error, RuntimeError) and 'Failed to bind' not in text:
    raise error
  for what, host, port in ports:
    if port and (f':{port}' in text or f', {port})' in text):
      return (f'cannot start the server: {what} port {port} on {host} is not '
              f'available ({text.split(";")[0]})')
  return f'cannot start the server: {text.split(";")[0]}'


def _set_tensorflow_threads(args):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for value, setter in (
      (args.tensorflow_intra_op_parallelism,
       tf.config.threading.set_intra_op_parallelism_threads),
      (args.tensorflow_inter_op_parallelism,
       tf.config.threading.set_inter_op_parallelism_threads)):
    if value < 0:
      raise UserError('TensorFlow thread counts must be >= 0')
    if value:
      setter(value)


def _add_predict(subparsers):
  parser = subparsers.add_parser(
      'predict', help='batch prediction over raw files (Beam)',
      description='Raw CSV or tf.Example records in, one prediction per good '
      'row out (JSON lines or CSV, keyed by file:line, or by the column '
      'predict.key_column names), rejected rows in OUTPUT.rejects.jsonl. Unknown flags are Beam pipeline options '
      '(--runner, --direct_running_mode, ...).')
  args_lib.add_config_args(parser)
  parser.add_argument('--input', required=True,
                      help='raw input file or glob, laid out as data.*')
  parser.add_argument('--output', required=True,
                      help='predictions file (.csv for CSV, else JSON lines)')
  parser.add_argument('--format', dest='data_format', default=None,
                      choices=('csv', 'tfrecord'),
                      help='input format (default: data.format)')
  parser.add_argument('--output_format', default=None,
                      choices=('jsonl', 'csv'),
                      help='default: from the --output extension')
  args_lib.add_export_choice(parser)
  parser.set_defaults(func=_predict, accepts_extra=True)


def _predict(args):
  from serving import predict  # pylint: disable=g-import-not-at-top
  quiet.quiet_tensorflow(args.verbose)
  config = args_lib.config_from_args(args)
  path = args_lib.chosen_export(config, args)
  if '://' not in args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  try:
    summary = predict.predict(
        config, path, args.input, args.output, data_format=args.data_format,
        output_format=args.output_format, beam_args=args.extra)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e))
  message = errors.rejects_message(summary['read'], summary['rejected'],
                                   summary['rejects'])
  if message:
    log.info('%s', message)
  print(json.dumps(summary, indent=2, sort_keys=True))


# The serving package's commands, in --help order.
_COMMANDS = [_add_predict, _add_serve]
