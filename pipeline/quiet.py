"""Quiet by default: TensorFlow's, Keras's and Beam's notices that say
nothing to an estpipe user, hidden unless `-v` is given.

Every command that loads TensorFlow calls `quiet_tensorflow` once it runs.
tf.estimator warns on every call that it is deprecated; tf.Transform warns
about its own table initializers on every trace; verify-export printed more
of these than results.
"""

import logging
import warnings

log = logging.getLogger('estpipe')


class _Noise(logging.Filter):
  """Log records whose message holds one of NOISE."""
  NOISE = (
      # One per dashed raw feature name (`capital-gain` ... Sanitizing to
      # `capital_gain`) when an export is loaded.
      'is not a valid tf.function parameter name',
      'Loading a TF2 SavedModel but eager mode seems disabled',
      # tf.Transform, on every trace of a preprocessing_fn with a vocabulary.
      'Tables initialized inside a tf.function',
      # Beam's TFRecord writer: a slower CRC, the same bytes.
      "Couldn't find python-snappy",
  )

  def filter(self, record):
    message = record.getMessage()
    return not any(text in message for text in self.NOISE)


_NOISE = _Noise()
# The loggers those records come from.
_LOGGERS = ('tensorflow', 'absl', 'apache_beam.io.tfrecordio')


def quiet_tensorflow(verbose):
  """Hides deprecation notices and known noise unless `verbose`."""
  # Progress lines are INFO; keep them whatever the root logger's level is.
  log.setLevel(logging.INFO)
  if verbose:
    return
  from tensorflow.python.util import deprecation  # pylint: disable=g-import-not-at-top
  deprecation._PRINT_DEPRECATION_WARNINGS = False  # pylint: disable=protected-access
  # Keras's own deprecation notices are UserWarnings (set_learning_phase,
  # Model.state_updates under model_to_estimator): -v shows them.
  warnings.filterwarnings('ignore', category=UserWarning,
                          module=r'keras(\.|$)')
  for name in _LOGGERS:
    logger = logging.getLogger(name)
    if _NOISE not in logger.filters:
      logger.addFilter(_NOISE)
