// The extension module _bnlab_speedups: the functions of conv2d.cpp and relu_maxpool.cpp.

#include <Python.h>

extern PyMethodDef bnlab_conv2d_methods[];
extern PyMethodDef bnlab_relu_maxpool_methods[];

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_bnlab_speedups", "The experiment's CPU convolution and pooling kernels",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__bnlab_speedups(void) {
    PyObject* module = PyModule_Create(&module_def);
    if (module && PyModule_AddFunctions(module, bnlab_conv2d_methods) != 0) Py_CLEAR(module);
    if (module && PyModule_AddFunctions(module, bnlab_relu_maxpool_methods) != 0) Py_CLEAR(module);
    return module;
}
