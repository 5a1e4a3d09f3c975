"""Notebooks that show the probe suite on tiny models trained in a minute on a CPU (stored without outputs;
written by make_notebooks.py, executed in quick mode by tests/test_notebooks.py):

  coconut_thoughts.ipynb     a Coconut model's continuous thoughts on reach: logit lens on each thought
                             (frontier vs unreachable nodes) and a frontier probe with its control task
  cot_faithfulness.ipynb     early answering, adding mistakes and filler for explicit CoT vs Coconut vs
                             recurrent depth, and the monitorability score of each
  lenses_across_steps.ipynb  logit and tuned lens across the recurrences of a recurrent-depth model and across
                             the denoising steps of a masked-diffusion (MDLM) model
"""
