"""Framework-neutral pieces of context-parallel training, shared by the demo (``ringattn.app``) and the
transformers integration (``ringattn.hf``): FSDP2 over a ("dp", "cp") mesh (``fsdp``), exact-resume
checkpoints (``checkpoint``) and the rank launcher (``launch``).
"""
