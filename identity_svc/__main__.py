from identity_svc.server import main

if __name__ == "__main__":
    main()
