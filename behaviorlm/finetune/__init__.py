"""The training stages after pretraining: preference (DPO, S-DPO), verifiable reward (GRPO), with
supervised fine-tuning on purchases as their control.

:mod:`~behaviorlm.finetune.pairs` builds the contexts, chosen and rejected items from training
events; :mod:`~behaviorlm.finetune.stages` runs the loop; the objectives themselves are plain
tensor functions in :mod:`behaviorlm.nn.preference`. ``BehaviorLM.finetune`` is the entry point.
"""
