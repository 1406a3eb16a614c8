def main():
    from clipmaps.actors import methods
    print("ok", methods)
