"""Stage 1 of EMORL: one LoRA adapter per objective, trained by k-SCST on that objective alone.

`scst` is the RL step, `loop` the Ray Train worker loop, `launch` runs the trainers in parallel.
"""
