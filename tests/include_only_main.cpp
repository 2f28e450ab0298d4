// Links the one-include translation units generated for each public header:
// if any header does not compile on its own, this binary does not build.
int main() { return 0; }
