"""estpipe: Estimator-based production ML pipelines.

This file also serves as Beam's --setup_file, so that remote workers
(Dataflow, portable runners) install the same four packages.
"""

import setuptools

# tf.estimator is gone from TensorFlow 2.16: the stack is pinned as a whole.
# Leaving Beam unpinned makes pip backtrack for many minutes.
REQUIRED = [
    'tensorflow==2.15.1',
    'tensorflow-estimator==2.15.0',
    'tensorflow-transform==1.15.0',
    'tfx-bsl==1.15.1',
    'apache-beam[gcp]==2.56.0',
    'tensorflow-serving-api==2.15.1',
    'pyyaml>=5.4',
    # Beam stages --setup_file (Dataflow, other remote workers) with
    # `python -m build --sdist`; without it staging retries for minutes.
    'build>=1.0',
]

TEST = [
    'pytest>=7',
    'pytest-timeout>=2',
    'requests>=2.25',
]

setuptools.setup(
    name='estpipe',
    version='0.1.0',
    description='Estimator-based ML pipelines: Beam + tf.Transform '
    'preprocessing, Estimator training, TF Serving-compatible serving.',
    python_requires='>=3.9,<3.12',
    packages=setuptools.find_packages(
        include=['pipeline', 'pipeline.*', 'estimators', 'estimators.*',
                 'preprocessing', 'preprocessing.*', 'serving',
                 'serving.*']),
    install_requires=REQUIRED,
    extras_require={'test': TEST},
    entry_points={'console_scripts': ['estpipe=pipeline.cli:run']},
)
