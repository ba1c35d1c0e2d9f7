"""TensorFlow without accelerators: it only runs tf.data pipelines and CLU's TensorBoard
writer here, so it must not take GPU memory (or a TPU) that JAX needs.

Every place that starts TensorFlow's runtime (`hooks.Writers.create`, before CLU's writers;
`lib.data.images`, before a tf.data pipeline) calls `hide_accelerators()` first. The
project installs `tensorflow-cpu`, which cannot use accelerators anyway; this keeps a full
`tensorflow` installed beside `jax[cuda12]` off the GPUs too.
"""


def hide_accelerators() -> None:
  """Makes only the CPU visible to TensorFlow (a no-op once its runtime has started)."""
  import tensorflow as tf

  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # runtime already started, or no such device kind
      pass
