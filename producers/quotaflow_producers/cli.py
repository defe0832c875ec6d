def register_demo(sub): pass
