"""GORS-style reward-weighted LoRA finetuning of Stable Diffusion on a run's accepted samples.

Plain PyTorch (no Ray): ``lora`` adds and saves the adapters, ``loss`` is GORS's objective, ``data`` streams
(image, caption, reward) from run folders, ``loop`` is the training step and its resumable state, ``record``
says where we differ from GORS as shipped. The Ray Train wiring is actors/finetune_trainer.py, the CLI
jobs/finetune.py.
"""
