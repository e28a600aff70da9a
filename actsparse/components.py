"""The logical component names (see ``actsparse.anatomy``), in a module without heavy imports so
the method registry and the config check can name them at workflow parse time."""

FFN_COMPONENTS = ("ffn_in", "gate", "act", "up", "h", "down")
ATTENTION_COMPONENTS = ("attn_in", "o_in")
COMPONENTS = FFN_COMPONENTS + ATTENTION_COMPONENTS
INPUT_COMPONENTS = ("ffn_in", "h", "attn_in", "o_in")  # inputs of projections (hooked as pre-hooks)
