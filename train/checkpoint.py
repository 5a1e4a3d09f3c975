"""Orbax checkpoints of the train state: periodic, final and on signals; restore falls back past corrupt ones.

Orbax writes each step to a temporary directory and renames it when complete, so a killed save leaves the
previous checkpoint intact. A checkpoint that is complete but unreadable (truncated or damaged files) is
reported, moved aside to `checkpoints_corrupt/` (nothing is deleted) and the one before it is used.
"""

import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, workdir, keep):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.corrupt_dir = os.path.abspath(os.path.join(workdir, "checkpoints_corrupt"))
    self.keep = keep
    self.manager = self._open()

  def _open(self):
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(self.directory, options=options)

  def save(self, step, state):
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()

  def restore(self, abstract_state):
    """(step, state) of the newest readable checkpoint, placed with abstract_state's shardings; (0, None) if none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # orbax raises many types for damaged files
        print(f"altbench: checkpoint step {step} in {self.directory} is unreadable ({type(e).__name__}: "
              f"{str(e)[:200]}); moving it to {self.corrupt_dir} and using the previous one", file=sys.stderr)
        if jax.process_index() == 0:
          os.makedirs(self.corrupt_dir, exist_ok=True)
          shutil.move(os.path.join(self.directory, str(step)), os.path.join(self.corrupt_dir, str(step)))
        self.manager.close()
        self.manager = self._open()
    return 0, None

  def close(self):
    self.manager.close()
