// The part of the ONNX Runtime C API that sparse_linear.cc uses, declared here (no ONNX Runtime header needed).
//
// ABI facts this relies on (stable across ORT releases; the C API only ever appends):
// - OrtApiBase is {GetApi, GetVersionString}; GetApi(version) returns the function table OrtApi of that version.
// - OrtApi is a table of function pointers in a fixed order. Only the entries called here are declared; the others
//   are padding of the same size (one pointer each), so every declared entry sits at its index in the table,
//   given in the comment beside it and checked by static_assert below. Indices as of ORT_API_VERSION 21 (ORT 1.21).
// - OrtCustomOp is filled by the library and read by ORT up to the fields of its `version`: all fields through
//   version 21 are declared, in order.
// - Object types (OrtStatus, OrtValue, ...) are opaque: only pointers to them cross the boundary.
#pragma once

#include <cstddef>
#include <cstdint>

#define ORT_API_VERSION 21
#define ORT_API_CALL  // the C calling convention (_stdcall only on 32-bit Windows, not built here)

extern "C" {

struct OrtStatus;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;
struct OrtKernelContext;
struct OrtKernelInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtShapeInferContext;
typedef OrtStatus* OrtStatusPtr;  // nullptr means success

typedef enum OrtErrorCode { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 } OrtErrorCode;  // first 3 of 12
typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,  // the only type this library uses (ONNX TensorProto.FLOAT)
} ONNXTensorElementDataType;
typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
} OrtCustomOpInputOutputCharacteristic;
typedef enum OrtMemType { OrtMemTypeCPUInput = -2, OrtMemTypeCPUOutput = -1, OrtMemTypeDefault = 0 } OrtMemType;

struct OrtApi;

struct OrtApiBase {
  const OrtApi*(ORT_API_CALL* GetApi)(uint32_t version) noexcept;
  const char*(ORT_API_CALL* GetVersionString)(void) noexcept;
};

typedef void* OrtApiUnusedEntry;  // an entry of the table this library does not call

struct OrtApi {
  OrtStatus*(ORT_API_CALL* CreateStatus)(OrtErrorCode code, const char* msg) noexcept;  // [0]
  OrtApiUnusedEntry unused_1_to_25[25];
  OrtStatusPtr(ORT_API_CALL* CreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out) noexcept;  // [26]
  OrtStatusPtr(ORT_API_CALL* CustomOpDomain_Add)(OrtCustomOpDomain* domain, const struct OrtCustomOp* op) noexcept;  // [27]
  OrtStatusPtr(ORT_API_CALL* AddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain) noexcept;  // [28]
  OrtApiUnusedEntry unused_29_to_50[22];
  OrtStatusPtr(ORT_API_CALL* GetTensorMutableData)(OrtValue* value, void** out) noexcept;  // [51]
  OrtApiUnusedEntry unused_52_to_60[9];
  OrtStatusPtr(ORT_API_CALL* GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out) noexcept;  // [61]
  OrtStatusPtr(ORT_API_CALL* GetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dim_values,
                                            size_t dim_values_length) noexcept;  // [62]
  OrtApiUnusedEntry unused_63_to_64[2];
  OrtStatusPtr(ORT_API_CALL* GetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out) noexcept;  // [65]
  OrtApiUnusedEntry unused_66_to_87[22];
  OrtStatusPtr(ORT_API_CALL* KernelContext_GetInputCount)(const OrtKernelContext* context, size_t* out) noexcept;  // [88]
  OrtApiUnusedEntry unused_89[1];
  OrtStatusPtr(ORT_API_CALL* KernelContext_GetInput)(const OrtKernelContext* context, size_t index,
                                                     const OrtValue** out) noexcept;  // [90]
  OrtStatusPtr(ORT_API_CALL* KernelContext_GetOutput)(OrtKernelContext* context, size_t index, const int64_t* dim_values,
                                                      size_t dim_count, OrtValue** out) noexcept;  // [91]
  OrtApiUnusedEntry unused_92_to_98[7];
  void(ORT_API_CALL* ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* input);  // [99]
  OrtApiUnusedEntry unused_100_to_273[174];
  OrtStatusPtr(ORT_API_CALL* KernelContext_ParallelFor)(const OrtKernelContext* context, void (*fn)(void*, size_t),
                                                        size_t total, size_t num_batch, void* usr_data) noexcept;  // [274]
  // entries 275 and later (284 in ORT 1.21) are not declared: this library only reads the table ORT owns
};

#define SPARSEC_ORT_ENTRY(name, index) \
  static_assert(offsetof(OrtApi, name) == (index) * sizeof(void*), "OrtApi::" #name " must be entry " #index)
SPARSEC_ORT_ENTRY(CreateStatus, 0);
SPARSEC_ORT_ENTRY(CreateCustomOpDomain, 26);
SPARSEC_ORT_ENTRY(CustomOpDomain_Add, 27);
SPARSEC_ORT_ENTRY(AddCustomOpDomain, 28);
SPARSEC_ORT_ENTRY(GetTensorMutableData, 51);
SPARSEC_ORT_ENTRY(GetDimensionsCount, 61);
SPARSEC_ORT_ENTRY(GetDimensions, 62);
SPARSEC_ORT_ENTRY(GetTensorTypeAndShape, 65);
SPARSEC_ORT_ENTRY(KernelContext_GetInputCount, 88);
SPARSEC_ORT_ENTRY(KernelContext_GetInput, 90);
SPARSEC_ORT_ENTRY(KernelContext_GetOutput, 91);
SPARSEC_ORT_ENTRY(ReleaseTensorTypeAndShapeInfo, 99);
SPARSEC_ORT_ENTRY(KernelContext_ParallelFor, 274);
#undef SPARSEC_ORT_ENTRY

// A custom op as ORT reads it: fields in order, through those of version 21 (ORT reads no further for version 21).
struct OrtCustomOp {
  uint32_t version;  // ORT_API_VERSION
  void*(ORT_API_CALL* CreateKernel)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char*(ORT_API_CALL* GetName)(const OrtCustomOp* op);
  const char*(ORT_API_CALL* GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetInputType)(const OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType(ORT_API_CALL* GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t(ORT_API_CALL* GetOutputTypeCount)(const OrtCustomOp* op);
  void(ORT_API_CALL* KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void(ORT_API_CALL* KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetInputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic(ORT_API_CALL* GetOutputCharacteristic)(const OrtCustomOp* op, size_t index);
  OrtMemType(ORT_API_CALL* GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int(ORT_API_CALL* GetVariadicInputMinArity)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatusPtr(ORT_API_CALL* CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                                             void** kernel);
  OrtStatusPtr(ORT_API_CALL* KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
  OrtStatusPtr(ORT_API_CALL* InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* context);
  int(ORT_API_CALL* GetStartVersion)(const OrtCustomOp* op);
  int(ORT_API_CALL* GetEndVersion)(const OrtCustomOp* op);
  size_t(ORT_API_CALL* GetMayInplace)(int** input_index, int** output_index);
  void(ORT_API_CALL* ReleaseMayInplace)(int* input_index, int* output_index);
  size_t(ORT_API_CALL* GetAliasMap)(int** input_index, int** output_index);
  void(ORT_API_CALL* ReleaseAliasMap)(int* input_index, int* output_index);
};
static_assert(sizeof(OrtCustomOp) == 8 + 25 * sizeof(void*) || sizeof(void*) != 8,
              "OrtCustomOp: a uint32 version (padded to 8 bytes) and 25 function pointers");

}  // extern "C"
