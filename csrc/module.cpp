// Python module entry for elogitnorm_fast._C. The module itself is empty: importing it loads this
// shared library, whose static initialisers register the ops with the dispatcher
// (TORCH_LIBRARY / TORCH_LIBRARY_IMPL in the other files of csrc/).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "elogitnorm_fast compiled ops (registered with torch.library)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
