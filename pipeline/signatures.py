"""The signature contract between what trains a model and what serves it.

Trainers write these signatures; the model server, batch prediction and the
skew check read them. Naming the keys, the methods and which prediction
feeds which output once keeps the two sides from drifting apart. Plain names
and functions over dicts, no framework: an Estimator head, a Keras
tf.function or the server can all build on them.
"""

from pipeline.config import TASKS

# The MetaGraph tag TF Serving loads.
SERVE_TAG = 'serve'

# Signature keys, as canned Estimators export them.
DEFAULT_SIGNATURE = 'serving_default'
CLASSIFY_SIGNATURE = 'classification'
REGRESS_SIGNATURE = 'regression'
PREDICT_SIGNATURE = 'predict'
# The receiver alternative of one dense tensor per raw feature: its
# signatures are `raw:<key>`.
RAW_RECEIVER = 'raw'

# Signature methods (SignatureDef.method_name).
PREDICT_METHOD = 'tensorflow/serving/predict'
CLASSIFY_METHOD = 'tensorflow/serving/classify'
REGRESS_METHOD = 'tensorflow/serving/regress'

# The serialized tf.Example inputs: the receiver's tensor (so the predict
# signature's input), and the one input classify and regress signatures take.
EXAMPLES_INPUT = 'examples'
CLASSIFY_INPUTS = 'inputs'
REGRESS_INPUTS = 'inputs'

# Outputs of the classify and regress signatures.
CLASSIFY_OUTPUT_CLASSES = 'classes'
CLASSIFY_OUTPUT_SCORES = 'scores'
REGRESS_OUTPUTS = 'outputs'

# The canned heads' prediction keys: the predict signature's outputs.
PROBABILITIES = 'probabilities'
LOGISTIC = 'logistic'
CLASS_IDS = 'class_ids'
CLASSES = 'classes'
ALL_CLASS_IDS = 'all_class_ids'
ALL_CLASSES = 'all_classes'
PREDICTIONS = 'predictions'
LOGITS = 'logits'


def raw_key(key):
  """The raw-feature signature of signature `key`."""
  return f'{RAW_RECEIVER}:{key}'


RAW_SIGNATURE = raw_key(PREDICT_SIGNATURE)


def is_raw(key):
  """Whether signature `key` takes raw-feature tensors."""
  return key.startswith(raw_key(''))


def output_sources(task):
  """{signature key: (method, {output key: prediction key})} for `task`.

  Which canned prediction feeds each output of the classify and regress
  signatures (a binary classifier also regresses: the positive class
  probability), `serving_default` among them. The predict signature, not
  listed, outputs every prediction.
  """
  if task == 'regression':
    sources = {REGRESS_SIGNATURE: (REGRESS_METHOD, {
        REGRESS_OUTPUTS: PREDICTIONS})}
    default = REGRESS_SIGNATURE
  else:
    sources = {CLASSIFY_SIGNATURE: (CLASSIFY_METHOD, {
        CLASSIFY_OUTPUT_SCORES: PROBABILITIES,
        CLASSIFY_OUTPUT_CLASSES: ALL_CLASSES})}
    if task == 'binary':
      sources[REGRESS_SIGNATURE] = (REGRESS_METHOD, {
          REGRESS_OUTPUTS: LOGISTIC})
    default = CLASSIFY_SIGNATURE
  sources[DEFAULT_SIGNATURE] = sources[default]
  return sources


def signature_outputs(task, predictions):
  """{signature key: (method, {output key: value})} to export for `task`.

  `predictions`: {prediction key: value} with the canned keys (tensors of any
  framework, or anything else: values are only looked up).
  """
  signatures = {PREDICT_SIGNATURE: (PREDICT_METHOD, dict(predictions))}
  for key, (method, sources) in output_sources(task).items():
    signatures[key] = (method, {output: predictions[prediction]
                                for output, prediction in sources.items()})
  return signatures


def output_aliases(method):
  """{output key: the prediction keys it stands for} of `method`'s signatures.

  Over all tasks: what an output can be compared with, task unknown.
  """
  aliases = {}
  for task in TASKS:
    for signature_method, sources in output_sources(task).values():
      if signature_method != method:
        continue
      for output, prediction in sources.items():
        known = aliases.setdefault(output, ())
        if prediction not in known:
          aliases[output] = known + (prediction,)
  return aliases


def predict_signature(keys):
  """The tf.Example predict signature among `keys`.

  Every model type exports `predict`; exports of Keras models made before
  they got the canned signatures (and Keras models with several outputs) have
  only a predict-method `serving_default`.
  """
  return (PREDICT_SIGNATURE if PREDICT_SIGNATURE in keys else
          DEFAULT_SIGNATURE)


def raw_signature(keys):
  """The raw-feature signature among `keys` (see predict_signature)."""
  return RAW_SIGNATURE if RAW_SIGNATURE in keys else raw_key(DEFAULT_SIGNATURE)
