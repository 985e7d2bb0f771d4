"""The offline reproduction of the AIM study on the toy zoo (`python -m study`, see __main__)."""
