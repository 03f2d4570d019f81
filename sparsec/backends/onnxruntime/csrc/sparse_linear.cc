// ONNX Runtime custom-op library: the thresholded linear layer of sparsec (domain "ai.sparsec", op SparseLinear).
//
//   Y = (X * (|X| > t)) @ Wt + B        X [..., K] float32, t 0-d, Wt [K, N] (the weight pre-transposed), B [N]
//
// Only the rows of Wt whose input is active (|x| > t, or NaN, which propagates as in torch) are read: a zero input
// skips one contiguous row of Wt. Per block of up to 4 rows of X the active indices are compacted once (their union
// over the block), then each output tile is accumulated from 4 weight rows per pass. Tiles of the output columns
// are shared out over ONNX Runtime's intra-op thread pool (KernelContext_ParallelFor).
// Built by sparsec.backends.onnxruntime.kernels with g++ -O3 -march=native; no ONNX Runtime header is needed.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ort_api_subset.h"  // the part of the ONNX Runtime C API used here, declared in this repository

namespace {

const OrtApi* g_api = nullptr;
constexpr int64_t kTileMax = 2048 + 16;  // output columns per task at most (8 KiB of accumulators per row)
constexpr int kRows = 4;                 // rows of X sharing one pass over the weights

struct Block {
  const float* wt;
  const float* bias;
  float* y;
  int64_t n, rows, tile;  // tile: output columns per task
  std::vector<int64_t> idx;    // active input indices (union over the block's rows)
  std::vector<float> vals;     // [rows][idx.size()] the inputs at those indices (0 where inactive in a row)
};

inline bool active(float v, float t) { return !(std::fabs(v) <= t); }  // NaN counts as active

void tile_one_row(const Block& b, int64_t c0, int64_t c1) {
  const int64_t w = c1 - c0, nnz = static_cast<int64_t>(b.idx.size());
  float acc[kTileMax];
  for (int64_t j = 0; j < w; ++j) acc[j] = b.bias ? b.bias[c0 + j] : 0.f;
  const float* v = b.vals.data();
  const int64_t* ix = b.idx.data();
  int64_t i = 0;
  for (; i + 4 <= nnz; i += 4) {
    const float *w0 = b.wt + ix[i] * b.n + c0, *w1 = b.wt + ix[i + 1] * b.n + c0,
                *w2 = b.wt + ix[i + 2] * b.n + c0, *w3 = b.wt + ix[i + 3] * b.n + c0;
    const float v0 = v[i], v1 = v[i + 1], v2 = v[i + 2], v3 = v[i + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < w; ++j) acc[j] += v0 * w0[j] + v1 * w1[j] + v2 * w2[j] + v3 * w3[j];
  }
  for (; i < nnz; ++i) {
    const float* w0 = b.wt + ix[i] * b.n + c0;
    const float v0 = v[i];
#pragma GCC ivdep
    for (int64_t j = 0; j < w; ++j) acc[j] += v0 * w0[j];
  }
  std::memcpy(b.y + c0, acc, sizeof(float) * w);
}

void tile_rows(const Block& b, int64_t c0, int64_t c1) {
  const int64_t w = c1 - c0, nnz = static_cast<int64_t>(b.idx.size()), r = b.rows;
  float acc[kRows][kTileMax];
  for (int64_t q = 0; q < r; ++q)
    for (int64_t j = 0; j < w; ++j) acc[q][j] = b.bias ? b.bias[c0 + j] : 0.f;
  for (int64_t i = 0; i < nnz; ++i) {
    const float* w0 = b.wt + b.idx[i] * b.n + c0;
    for (int64_t q = 0; q < r; ++q) {
      const float v0 = b.vals[q * nnz + i];
      if (v0 == 0.f) continue;
      float* a = acc[q];
#pragma GCC ivdep
      for (int64_t j = 0; j < w; ++j) a[j] += v0 * w0[j];
    }
  }
  for (int64_t q = 0; q < r; ++q) std::memcpy(b.y + q * b.n + c0, acc[q], sizeof(float) * w);
}

void run_tile(void* data, size_t task) {
  const Block& b = *static_cast<const Block*>(data);
  const int64_t c0 = static_cast<int64_t>(task) * b.tile, c1 = c0 + b.tile < b.n ? c0 + b.tile : b.n;
  if (b.rows == 1)
    tile_one_row(b, c0, c1);
  else
    tile_rows(b, c0, c1);
}

OrtStatus* error(const char* msg) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, msg); }

#define RETURN_IF_ERROR(expr)          \
  do {                                 \
    OrtStatus* _s = (expr);            \
    if (_s != nullptr) return _s;      \
  } while (0)

std::vector<int64_t> shape_of(const OrtValue* v, OrtStatus** status) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  std::vector<int64_t> dims;
  *status = g_api->GetTensorTypeAndShape(v, &info);
  if (*status) return dims;
  size_t n = 0;
  *status = g_api->GetDimensionsCount(info, &n);
  if (!*status) {
    dims.resize(n);
    *status = g_api->GetDimensions(info, dims.data(), n);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return dims;
}

// the read-only data of an input (the C API of ORT 1.21 has only the mutable accessor)
OrtStatus* data_of(const OrtValue* v, const float** out) {
  void* p = nullptr;
  OrtStatus* st = g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p);
  *out = static_cast<const float*>(p);
  return st;
}

OrtStatus* ORT_API_CALL compute(void* /*kernel*/, OrtKernelContext* ctx) {
  size_t n_inputs = 0;
  RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(ctx, &n_inputs));
  const OrtValue *x_v = nullptr, *t_v = nullptr, *w_v = nullptr, *b_v = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 0, &x_v));
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 1, &t_v));
  RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 2, &w_v));
  if (n_inputs > 3) RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, 3, &b_v));
  OrtStatus* st = nullptr;
  std::vector<int64_t> xs = shape_of(x_v, &st);
  if (st) return st;
  std::vector<int64_t> ws = shape_of(w_v, &st);
  if (st) return st;
  if (xs.empty() || ws.size() != 2 || ws[0] != xs.back())
    return error("SparseLinear: X must be [..., K] and Wt [K, N]");
  const int64_t k = ws[0], n = ws[1];
  int64_t m = 1;
  for (size_t i = 0; i + 1 < xs.size(); ++i) m *= xs[i];
  if (b_v) {
    std::vector<int64_t> bs = shape_of(b_v, &st);
    if (st) return st;
    if (bs.size() != 1 || bs[0] != n) return error("SparseLinear: B must be [N]");
  }
  const float *x = nullptr, *t = nullptr, *wt = nullptr, *bias = nullptr;
  RETURN_IF_ERROR(data_of(x_v, &x));
  RETURN_IF_ERROR(data_of(t_v, &t));
  RETURN_IF_ERROR(data_of(w_v, &wt));
  if (b_v) RETURN_IF_ERROR(data_of(b_v, &bias));
  std::vector<int64_t> ys(xs);
  ys.back() = n;
  OrtValue* y_v = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, ys.data(), ys.size(), &y_v));
  float* y = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(y_v, reinterpret_cast<void**>(&y)));
  if (m == 0 || n == 0) return nullptr;
  const float thr = *t;
  // an even number of column tiles of at most ~2048 (two threads share them evenly; each task streams whole
  // tile-wide segments of the active weight rows)
  const int64_t want = 2 * ((n + 4095) / 4096);
  const int64_t tile = ((n + want - 1) / want + 15) / 16 * 16;
  Block b{wt, bias, nullptr, n, 0, tile, {}, {}};
  b.idx.reserve(k);
  const size_t tasks = static_cast<size_t>((n + tile - 1) / tile);
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    b.rows = m - r0 < kRows ? m - r0 : kRows;
    b.y = y + r0 * n;
    b.idx.clear();
    for (int64_t j = 0; j < k; ++j) {
      bool any = false;
      for (int64_t q = 0; q < b.rows; ++q) any |= active(x[(r0 + q) * k + j], thr);
      if (any) b.idx.push_back(j);
    }
    const int64_t nnz = static_cast<int64_t>(b.idx.size());
    b.vals.resize(static_cast<size_t>(b.rows * nnz));
    for (int64_t q = 0; q < b.rows; ++q)
      for (int64_t i = 0; i < nnz; ++i) {
        const float v = x[(r0 + q) * k + b.idx[i]];
        b.vals[q * nnz + i] = active(v, thr) ? v : 0.f;
      }
    if (nnz * n * b.rows < (1 << 17)) {  // too little work to be worth waking the thread pool
      for (size_t task = 0; task < tasks; ++task) run_tile(&b, task);
    } else {
      RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(ctx, run_tile, tasks, 0, &b));
    }
  }
  return nullptr;
}

OrtStatus* ORT_API_CALL create_kernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  *kernel = reinterpret_cast<void*>(1);  // stateless
  return nullptr;
}
void ORT_API_CALL destroy_kernel(void*) {}
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "SparseLinear"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
ONNXTensorElementDataType ORT_API_CALL float_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL input_count(const OrtCustomOp*) { return 4; }
size_t ORT_API_CALL output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL input_kind(const OrtCustomOp*, size_t i) {
  return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL output_kind(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL mem_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL end_version(const OrtCustomOp*) { return 1; }

OrtCustomOp make_op() {
  OrtCustomOp op;
  std::memset(&op, 0, sizeof(op));
  op.version = ORT_API_VERSION;
  op.GetName = op_name;
  op.GetExecutionProviderType = op_provider;
  op.GetInputType = float_type;
  op.GetInputTypeCount = input_count;
  op.GetOutputType = float_type;
  op.GetOutputTypeCount = output_count;
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = input_kind;
  op.GetOutputCharacteristic = output_kind;
  op.GetInputMemoryType = mem_type;
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.GetStartVersion = start_version;
  op.GetEndVersion = end_version;
  return op;
}

OrtCustomOp g_op = make_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // cannot even report: ORT older than the header (1.21)
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(g_api->CreateCustomOpDomain("ai.sparsec", &domain));
  RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_op));
  return g_api->AddCustomOpDomain(options, domain);
}
