"""Code that a test prepends to a subprocess so that importing torch or
transformers fails there: proves the runtime works where neither exists."""

PRELUDE = """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""
