// safetensors: parse + validate (as strictly as the Rust library, with messages naming file and tensor), memory-map,
// convert, and write byte-exact. The header is parsed with nlohmann::json; the writer emits the JSON itself so the
// bytes match serde_json's compact output.
#include <kmoe/io/safetensors_file.hpp>

#include <kmoe/core/progress.hpp>
#include <kmoe/io/atomic_file.hpp>

#include "detail/json.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <numeric>
#include <set>
#include <unordered_map>
#include <functional>

namespace kmoe::io {

namespace {

// The Rust library refuses headers over 100 MB; so do we (a corrupt size must not make us allocate gigabytes).
constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

/// A read-only private mapping of a whole file.
struct Mapping {
  const std::byte* data = nullptr;
  std::size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (data) ::munmap(const_cast<std::byte*>(data), size);
  }
};

std::shared_ptr<const Mapping> map_file(const std::filesystem::path& path) {
  const std::string p = path.string();
  // O_NONBLOCK: opening a FIFO must not wait for a writer; its type is refused right after.
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  KMOE_CHECK_INPUT(fd >= 0, p, ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw InputError(detail::concat(p, ": cannot stat: ", std::strerror(e)));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw InputError(detail::concat(p, ": not a regular file (", S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket", ")"));
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<std::size_t>(st.st_size);
  if (m->size == 0) {
    ::close(fd);
    throw InputError(detail::concat(p, ": empty file (a safetensors file starts with an 8-byte header size)"));
  }
  void* addr = ::mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int e = errno;
  ::close(fd);  // the mapping stays valid
  KMOE_CHECK_INPUT(addr != MAP_FAILED, p, ": cannot mmap ", m->size, " bytes: ", std::strerror(e));
  m->data = static_cast<const std::byte*>(addr);
  return m;
}

/// Index of the first byte that is not valid UTF-8 (kmoe::detail::utf8_length's rules); n if valid.
std::size_t utf8_invalid_at(const unsigned char* s, std::size_t n) {
  const std::string_view v(reinterpret_cast<const char*>(s), n);
  for (std::size_t i = 0; i < n;) {
    const std::size_t len = kmoe::detail::utf8_length(v, i);
    if (len == 0) return i;
    i += len;
  }
  return n;
}

}  // namespace

struct SafetensorsFile::Impl {
  std::filesystem::path path;
  std::shared_ptr<const void> owner;  // the mapping or the in-memory bytes
  const std::byte* bytes = nullptr;
  std::uint64_t size = 0, header_size = 0;
  std::vector<TensorView> tensors;  // file order
  std::unordered_map<std::string, std::size_t> index;
  std::map<std::string, std::string> metadata;
  MetadataEntries metadata_entries;  // header order
  bool has_metadata = false;
};

namespace {

/// Deepest nesting a header may have. A valid header needs 3 (the object, a tensor entry, its shape); the bound
/// leaves room for unknown fields, which are skipped like the Rust library's serde does, and keeps hostile headers
/// ([[[[...) from costing memory or stack anywhere downstream.
constexpr int kMaxHeaderDepth = 64;

/// One tensor entry as the header states it, before validation.
struct RawEntry {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;  // moved into the TensorView: a shape costs 8 bytes per dimension, once
  std::vector<std::uint64_t> offsets;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  bool dimension_too_large = false;  // a dimension above 2^63 - 1
};

/// A JSON value's kind for messages.
const char* kind_name(int kind) {
  static const char* names[] = {"null", "boolean", "number", "string", "array", "object"};
  return names[kind];
}
enum Kind { kNull, kBool, kNumber, kString, kArray, kObject };

/// SAX handler for a safetensors header: builds the entries directly (no DOM), so that memory stays linear in the
/// header size and the work linear in the number of tensors; rejects what the Rust library rejects (duplicate
/// fields of an entry, wrong types) with messages that name the tensor.
class HeaderSax {
 public:
  /// `on_entry` receives each tensor entry once it is complete (validated and stored by the caller, so that only
  /// one raw entry exists at a time); `index` receives every name, mapped to its entry's number.
  HeaderSax(std::string file, std::function<void(RawEntry&)> on_entry,
            std::unordered_map<std::string, std::size_t>& index, MetadataEntries& metadata, bool& has_metadata)
      : file_(std::move(file)), on_entry_(std::move(on_entry)), metadata_(metadata), has_metadata_(has_metadata),
        index_(index) {}

  using json = detail::json;
  bool null() { return scalar(kNull, "null"); }
  bool boolean(bool v) { return scalar(kBool, v ? "true" : "false"); }
  bool number_integer(json::number_integer_t v) {
    if (v >= 0) return number_unsigned(static_cast<std::uint64_t>(v));
    if (state_ == State::Shape || state_ == State::Offsets)
      fail(where(), ": negative ", state_ == State::Shape ? "dimension " : "data offset ", v);
    return scalar(kNumber, std::to_string(v));
  }
  bool number_unsigned(json::number_unsigned_t v) {
    if (state_ == State::Shape) {
      RawEntry& e = cur_;
      constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      if (v > kMax) e.dimension_too_large = true;
      e.shape.push_back(static_cast<std::int64_t>(std::min(v, kMax)));
      return true;
    }
    if (state_ == State::Offsets) {
      cur_.offsets.push_back(v);
      return true;
    }
    return scalar(kNumber, std::to_string(v));
  }
  bool number_float(json::number_float_t, const json::string_t& text) { return scalar(kNumber, text); }
  bool string(json::string_t& v) {
    if (state_ == State::Dtype) {
      cur_.dtype = std::move(v);
      state_ = State::Entry;
      return true;
    }
    if (state_ == State::MetadataValue) {
      check_no_nul(v, "__metadata__ value of '" + printable(key_) + "'");
      const auto [it, fresh] = metadata_index_.try_emplace(key_, metadata_.size());
      if (fresh)
        metadata_.emplace_back(key_, std::move(v));
      else
        metadata_[it->second].second = std::move(v);  // a repeated key keeps its first place and its last value
      state_ = State::Metadata;
      return true;
    }
    return scalar(kString, "\"" + printable(v, 64) + "\"");
  }
  bool binary(json::binary_t&) { return scalar(kString, "binary"); }

  bool start_object(std::size_t) {
    enter();
    switch (state_) {
      case State::Start: state_ = State::Root; return true;
      case State::RootValue:
        if (key_ == "__metadata__") {
          has_metadata_ = true;
          state_ = State::Metadata;
        } else {
          state_ = State::Entry;
        }
        return true;
      default: return nested(kObject);
    }
  }
  bool start_array(std::size_t) {
    enter();
    switch (state_) {
      case State::Start: fail(file_, ": header is not a JSON object");
      case State::ShapeValue: state_ = State::Shape; return true;
      case State::OffsetsValue: state_ = State::Offsets; return true;
      default: return nested(kArray);
    }
  }
  bool end_object() {
    --depth_;
    switch (state_) {
      case State::Skip: return end_skip();
      case State::Metadata: state_ = State::Root; return true;
      case State::Entry: {
        KMOE_CHECK_INPUT(cur_.has_dtype && cur_.has_shape && cur_.has_offsets, where(),
                         ": entry needs \"dtype\", \"shape\" and \"data_offsets\"");
        on_entry_(cur_);
        state_ = State::Root;
        return true;
      }
      case State::Root: state_ = State::Done; return true;
      default: KMOE_ASSERT(false, "safetensors header: end of object in state ", int(state_));
    }
    return false;
  }
  bool end_array() {
    --depth_;
    switch (state_) {
      case State::Skip: return end_skip();
      case State::Shape:
      case State::Offsets: state_ = State::Entry; return true;
      default: KMOE_ASSERT(false, "safetensors header: end of array in state ", int(state_));
    }
    return false;
  }
  bool key(json::string_t& k) {
    if (state_ == State::Root) {
      if (k == "__metadata__") {
        KMOE_CHECK_INPUT(!seen_metadata_, file_, ": \"__metadata__\" given twice");
        seen_metadata_ = true;
      } else {
        check_no_nul(k, "tensor name '" + printable(k) + "'");
        KMOE_CHECK_INPUT(index_.emplace(k, index_.size()).second, file_, ": tensor '", printable(k),
                         "' is listed twice in the header");
        cur_ = RawEntry{};
        cur_.name = k;
      }
      key_ = std::move(k);
      state_ = State::RootValue;
      return true;
    }
    if (state_ == State::Metadata) {
      check_no_nul(k, "__metadata__ key '" + printable(k) + "'");
      key_ = std::move(k);
      state_ = State::MetadataValue;
      return true;
    }
    if (state_ == State::Entry) {
      RawEntry& e = cur_;
      const auto field = [&](bool& seen, State next) {
        // serde (the Rust library) refuses a repeated field instead of keeping one of the values.
        KMOE_CHECK_INPUT(!seen, where(), ": duplicate field \"", k, "\" in the entry");
        seen = true;
        state_ = next;
      };
      if (k == "dtype")
        field(e.has_dtype, State::Dtype);
      else if (k == "shape")
        field(e.has_shape, State::ShapeValue);
      else if (k == "data_offsets")
        field(e.has_offsets, State::OffsetsValue);
      else
        state_ = State::SkipValue;  // unknown fields are ignored, as serde does
      return true;
    }
    KMOE_ASSERT(state_ == State::Skip, "safetensors header: key in state ", int(state_));
    return true;
  }
  bool parse_error(std::size_t position, const std::string&, const json::exception& e) {
    std::string what = e.what();
    fail(file_, ": header is not valid JSON (at header offset ", position, "): ", what);
  }

  bool done() const { return state_ == State::Done; }

 private:
  enum class State {
    Start, Root, RootValue, Metadata, MetadataValue, Entry, Dtype, ShapeValue, Shape, OffsetsValue, Offsets,
    SkipValue, Skip, Done
  };

  template <class... Args>
  [[noreturn]] static void fail(Args&&... args) {
    throw InputError(detail::concat(std::forward<Args>(args)...));
  }
  static std::string printable(const std::string& s, std::size_t max = 256) { return kmoe::detail::printable(s, max); }

  std::string where() const { return file_ + ": tensor '" + printable(cur_.name) + "'"; }

  void check_no_nul(const std::string& s, const std::string& what) const {
    KMOE_CHECK_INPUT(s.find('\0') == std::string::npos, file_, ": ", what, " contains a NUL character (\\u0000)");
  }

  void enter() {
    KMOE_CHECK_INPUT(++depth_ <= kMaxHeaderDepth, file_, ": header nests deeper than ", kMaxHeaderDepth,
                     " levels: not a safetensors header");
  }

  /// A scalar where the state expects one (or not).
  bool scalar(int kind, const std::string& text) {
    switch (state_) {
      case State::SkipValue: state_ = State::Entry; return true;
      case State::Skip: return true;
      default: return wrong(kind, text);
    }
  }
  /// An object or array opening inside a value of the given state.
  bool nested(int kind) {
    switch (state_) {
      case State::SkipValue: skip_from_ = depth_; state_ = State::Skip; return true;
      case State::Skip: return true;
      default: return wrong(kind, kind_name(kind));
    }
  }
  bool end_skip() {
    if (depth_ < skip_from_) state_ = State::Entry;
    return true;
  }
  [[noreturn]] bool wrong(int kind, const std::string& text) {
    const std::string got = kind == kArray || kind == kObject ? std::string("an ") + kind_name(kind) : text;
    switch (state_) {
      case State::RootValue:
        if (key_ == "__metadata__") fail(file_, ": __metadata__ must be an object of strings, got ", got);
        fail(where(), ": entry must be an object, got ", got);
      case State::MetadataValue:
        fail(file_, ": __metadata__ value of '", printable(key_), "' must be a string, got ", kind_name(kind));
      case State::Dtype: fail(where(), ": dtype must be a string, got ", got);
      case State::ShapeValue: fail(where(), ": shape must be an array, got ", got);
      case State::Shape: fail(where(), ": dimension must be a non-negative integer, got ", got);
      case State::OffsetsValue: fail(where(), ": data_offsets must be [begin, end], got ", got);
      case State::Offsets: fail(where(), ": data offset must be a non-negative integer, got ", got);
      default: fail(file_, ": header is not a JSON object");
    }
  }

  std::string file_;
  std::function<void(RawEntry&)> on_entry_;
  RawEntry cur_;  // the entry being read
  MetadataEntries& metadata_;
  bool& has_metadata_;
  State state_ = State::Start;
  int depth_ = 0, skip_from_ = 0;
  std::string key_;
  bool seen_metadata_ = false;
  std::unordered_map<std::string, std::size_t>& index_;  // name -> entry (file order once validated)
  std::unordered_map<std::string, std::size_t> metadata_index_;
};

/// Parses and validates the header and buffer layout of a whole file of `size` bytes at `bytes`.
void parse(SafetensorsFile::Impl& f) {
  const std::string file = f.path.string();
  KMOE_CHECK_INPUT(f.size > 0, file, ": empty file (a safetensors file starts with an 8-byte header size)");
  KMOE_CHECK_INPUT(f.size >= 8, file, ": file too short (", f.size, " bytes) for the 8-byte header size");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(f.bytes[i]);  // little-endian
  KMOE_CHECK_INPUT(n <= kMaxHeaderSize, file, ": header size ", n, " is absurd (limit ", kMaxHeaderSize,
                   " bytes): not a safetensors file?");
  KMOE_CHECK_INPUT(n <= f.size - 8, file, ": header size ", n, " runs past the end of the file (", f.size,
                   " bytes): file cut short or not a safetensors file");
  KMOE_CHECK_INPUT(n >= 2, file, ": header size ", n, " is too small for a JSON object");
  f.header_size = n;
  const auto* h = reinterpret_cast<const unsigned char*>(f.bytes + 8);
  const std::size_t bad = utf8_invalid_at(h, static_cast<std::size_t>(n));
  KMOE_CHECK_INPUT(bad == n, file, ": header is not UTF-8 (invalid byte 0x", std::hex,
                   static_cast<unsigned>(h[bad]), std::dec, " at header offset ", bad, ")");
  KMOE_CHECK_INPUT(h[0] == '{', file, ": header does not start with '{' (not a safetensors file?)");
  const std::uint64_t data_size = f.size - 8 - n;
  std::vector<TensorView> tensors;
  const auto on_entry = [&](RawEntry& r) {
    TensorView t;
    t.name = std::move(r.name);
    t.file = file;
    const std::string where = t.where();
    const auto dtype = parse_dtype(r.dtype);
    if (!dtype) {
      try {
        dtype_from_name(r.dtype);
      } catch (const InputError& e) {
        throw InputError(detail::concat(where, ": ", e.what()));
      }
    }
    t.dtype = *dtype;
    std::uint64_t numel = 1;
    bool overflow = r.dimension_too_large;
    t.shape = std::move(r.shape);
    for (const std::int64_t d : t.shape) {
      const auto v = static_cast<std::uint64_t>(d);
      if (v != 0 && numel > std::numeric_limits<std::uint64_t>::max() / v) overflow = true;
      numel *= v;
    }
    KMOE_CHECK_INPUT(!overflow && numel <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                     where, ": shape ", t.shape_string(), " overflows (more than 2^63 elements)");
    KMOE_CHECK_INPUT(numel <= std::numeric_limits<std::uint64_t>::max() / dtype_bits(t.dtype), where, ": shape ",
                     t.shape_string(), " of ", dtype_name(t.dtype), " overflows (", numel, " elements x ",
                     dtype_bits(t.dtype), " bits is more than 2^64 bits)");
    const auto nbytes = dtype_nbytes(t.dtype, static_cast<std::int64_t>(numel));
    KMOE_CHECK_INPUT(nbytes.has_value(), where, ": shape ", t.shape_string(), " of ", dtype_name(t.dtype),
                     " is not a whole number of bytes");
    KMOE_CHECK_INPUT(r.offsets.size() == 2, where, ": data_offsets must be [begin, end], got ", r.offsets.size(),
                     " numbers");
    const std::uint64_t b = r.offsets[0], e = r.offsets[1];
    KMOE_CHECK_INPUT(b <= e, where, ": data_offsets [", b, ", ", e, "] end before they begin");
    KMOE_CHECK_INPUT(e - b == *nbytes, where, ": shape ", t.shape_string(), " of ", dtype_name(t.dtype), " needs ",
                     *nbytes, " bytes but data_offsets [", b, ", ", e, "] hold ", e - b);
    KMOE_CHECK_INPUT(e <= data_size, where, ": data_offsets [", b, ", ", e, "] run past the end of the data (",
                     data_size, " bytes): file cut short?");
    t.nbytes = static_cast<std::size_t>(*nbytes);
    t.data = f.bytes + 8 + n + b;
    tensors.push_back(std::move(t));
  };
  HeaderSax sax(file, on_entry, f.index, f.metadata_entries, f.has_metadata);
  detail::json::sax_parse(h, h + n, &sax);
  KMOE_CHECK_INPUT(sax.done(), file, ": header is not a JSON object");
  for (const auto& [k, v] : f.metadata_entries) f.metadata[k] = v;

  // The data must be covered exactly once, as the Rust library demands: sorted by offsets, each tensor starts where
  // the previous one ended, and the last ends at the end of the file. The views are sorted in place (a tensor's
  // offsets are its data pointer and size), so no second list of the tensors is held.
  const std::byte* const base = f.bytes + 8 + n;
  const auto begin_of = [&](const TensorView& t) { return static_cast<std::uint64_t>(t.data - base); };
  std::sort(tensors.begin(), tensors.end(), [](const TensorView& a, const TensorView& b) {
    return a.data != b.data ? a.data < b.data : a.nbytes < b.nbytes;
  });
  std::uint64_t pos = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const TensorView& t = tensors[i];
    const std::uint64_t b = begin_of(t), e = b + t.nbytes;
    if (b < pos) {
      throw InputError(detail::concat(file, ": tensor '", kmoe::detail::printable(t.name), "' data_offsets [", b,
                                      ", ", e, "] overlap tensor '", kmoe::detail::printable(tensors[i - 1].name),
                                      "' (ends at ", pos, ")"));
    }
    KMOE_CHECK_INPUT(b == pos, file, ": hole of ", b - pos, " bytes in the data before tensor '",
                     kmoe::detail::printable(t.name), "' (data_offsets [", b, ", ", e, "], previous tensor ends at ",
                     pos, ")");
    pos = e;
  }
  KMOE_CHECK_INPUT(pos == data_size, file, ": ", data_size - pos, " trailing bytes after the last tensor (data is ",
                   data_size, " bytes, tensors cover ", pos, ")");
  for (std::size_t i = 0; i < tensors.size(); ++i) f.index.find(tensors[i].name)->second = i;
  f.tensors = std::move(tensors);
  for (auto& t : f.tensors) t.owner = f.owner;
}

}  // namespace

// ---- TensorView -----------------------------------------------------------------------------------------------

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

namespace {
std::string shape_text(const std::vector<std::int64_t>& shape) { return kmoe::detail::dims_text(shape); }
}  // namespace

std::string TensorView::shape_string() const { return shape_text(shape); }

std::string TensorView::where() const {
  return detail::concat(file, ": tensor '", kmoe::detail::printable(name), "'");
}

// ---- SafetensorsFile ------------------------------------------------------------------------------------------

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  auto m = map_file(path);
  auto impl = std::make_shared<Impl>();
  impl->path = path;
  impl->bytes = m->data;
  impl->size = m->size;
  impl->owner = m;
  parse(*impl);
  SafetensorsFile f;
  f.impl_ = std::move(impl);
  return f;
}

SafetensorsFile SafetensorsFile::from_bytes(std::shared_ptr<const std::vector<std::byte>> bytes,
                                            const std::string& label) {
  KMOE_ASSERT(bytes != nullptr);
  auto impl = std::make_shared<Impl>();
  impl->path = label;
  impl->bytes = bytes->data();
  impl->size = bytes->size();
  impl->owner = bytes;
  parse(*impl);
  SafetensorsFile f;
  f.impl_ = std::move(impl);
  return f;
}

const TensorView& SafetensorsFile::tensor(const std::string& name) const {
  const auto it = impl_->index.find(name);
  KMOE_CHECK_INPUT(it != impl_->index.end(), impl_->path.string(), ": no tensor '", name, "' (the file has ",
                   impl_->tensors.size(), " tensors)");
  return impl_->tensors[it->second];
}

bool SafetensorsFile::has(const std::string& name) const { return impl_->index.count(name) != 0; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->tensors.size());
  for (const auto& t : impl_->tensors) out.push_back(t.name);
  return out;
}

const std::vector<TensorView>& SafetensorsFile::tensors() const { return impl_->tensors; }
const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }
const MetadataEntries& SafetensorsFile::metadata_entries() const { return impl_->metadata_entries; }
bool SafetensorsFile::has_metadata() const { return impl_->has_metadata; }
const std::filesystem::path& SafetensorsFile::path() const { return impl_->path; }
std::uint64_t SafetensorsFile::header_size() const { return impl_->header_size; }
std::uint64_t SafetensorsFile::file_size() const { return impl_->size; }

// ---- writing --------------------------------------------------------------------------------------------------

std::size_t TensorToWrite::expected_nbytes() const {
  std::int64_t numel = 1;
  for (auto d : shape) {
    KMOE_CHECK_INPUT(d >= 0, "tensor '", name, "': negative dimension in shape ", shape_text(shape));
    KMOE_CHECK_INPUT(d == 0 || numel <= std::numeric_limits<std::int64_t>::max() / d, "tensor '", name, "': shape ",
                     shape_text(shape), " overflows");
    numel *= d;
  }
  KMOE_CHECK_INPUT(static_cast<std::uint64_t>(numel) <= std::numeric_limits<std::uint64_t>::max() / dtype_bits(dtype),
                   "tensor '", kmoe::detail::printable(name), "': shape ", shape_text(shape), " of ", dtype_name(dtype),
                   " overflows (", numel, " elements x ", dtype_bits(dtype), " bits is more than 2^64 bits)");
  const auto nb = dtype_nbytes(dtype, numel);
  KMOE_CHECK_INPUT(nb.has_value(), "tensor '", kmoe::detail::printable(name), "': shape ", shape_text(shape), " of ",
                   dtype_name(dtype), " is not a whole number of bytes");
  return static_cast<std::size_t>(*nb);
}

TensorToWrite TensorToWrite::borrow(const TensorView& t) { return borrow(t.name, t); }

TensorToWrite TensorToWrite::borrow(std::string name, const TensorView& t) {
  TensorToWrite w;
  w.name = std::move(name);
  w.dtype = t.dtype;
  w.shape = t.shape;
  w.data = t.data;
  if (!w.data) w.data = "";  // zero-size tensors still borrow (nothing)
  return w;
}

namespace {

/// A JSON string as serde_json writes it: `"` and `\` escaped, control characters as \b \t \n \f \r or \u00xx
/// (lower-case hex), everything else (UTF-8 included) verbatim.
void json_string(std::string& out, const std::string& s) {
  static const char* hex = "0123456789abcdef";
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

}  // namespace

std::string safetensors_header_json(const std::vector<TensorToWrite>& tensors,
                                    const std::optional<MetadataEntries>& metadata,
                                    std::vector<std::size_t>* order_out) {
  std::vector<std::size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), 0);
  // The Python library's order: descending dtype (its enum order = ours), then name.
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    if (tensors[a].dtype != tensors[b].dtype) return tensors[a].dtype > tensors[b].dtype;
    return tensors[a].name < tensors[b].name;
  });
  std::set<std::string> seen;
  for (const auto& t : tensors) {
    KMOE_CHECK_INPUT(t.name != "__metadata__", "a tensor cannot be called __metadata__");
    KMOE_CHECK_INPUT(seen.insert(t.name).second, "tensor '", t.name, "' given twice");
  }
  std::string h = "{";
  bool first = true;
  if (metadata) {
    h += "\"__metadata__\":{";
    bool mfirst = true;
    std::set<std::string> keys;
    for (const auto& [k, v] : *metadata) {
      KMOE_CHECK_INPUT(keys.insert(k).second, "metadata key '", k, "' given twice");
      if (!mfirst) h += ',';
      mfirst = false;
      json_string(h, k);
      h += ':';
      json_string(h, v);
    }
    h += '}';
    first = false;
  }
  std::uint64_t offset = 0;
  for (std::size_t i : order) {
    const auto& t = tensors[i];
    const std::size_t nb = t.expected_nbytes();
    if (!first) h += ',';
    first = false;
    json_string(h, t.name);
    h += ":{\"dtype\":\"";
    h += dtype_name(t.dtype);
    h += "\",\"shape\":[";
    for (std::size_t d = 0; d < t.shape.size(); ++d) h += (d ? "," : "") + std::to_string(t.shape[d]);
    h += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nb) + "]}";
    offset += nb;
  }
  h += '}';
  if (order_out) *order_out = std::move(order);
  return h;
}

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::optional<std::map<std::string, std::string>>& metadata) {
  std::optional<MetadataEntries> entries;
  if (metadata) entries = MetadataEntries(metadata->begin(), metadata->end());  // sorted by key
  write_safetensors_ordered(path, tensors, entries);
}

void write_safetensors_ordered(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                               const std::optional<MetadataEntries>& metadata) {
  std::vector<std::size_t> order;
  std::string header;
  try {
    header = safetensors_header_json(tensors, metadata, &order);
  } catch (const InputError& e) {
    throw InputError(detail::concat(path.string(), ": ", e.what()));
  }
  for (const auto& t : tensors)
    KMOE_CHECK_INPUT(t.bytes() != nullptr || t.expected_nbytes() == 0, path.string(), ": tensor '", t.name,
                     "' has no data");
  for (const auto& t : tensors)
    KMOE_CHECK_INPUT(t.data != nullptr || t.owned.size() == t.expected_nbytes(), path.string(), ": tensor '", t.name,
                     "' holds ", t.owned.size(), " bytes but ", dtype_name(t.dtype), " ", shape_text(t.shape),
                     " needs ", t.expected_nbytes());
  header.append((8 - header.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  std::uint64_t total = 0;
  for (const auto& t : tensors) total += t.expected_nbytes();
  unsigned char size_le[8];
  for (int i = 0; i < 8; ++i) size_le[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(header.size()) >> (8 * i));
  AtomicFile out(path);
  ProgressBar bar("writing " + path.filename().string(), static_cast<std::int64_t>(total), ProgressBar::Unit::Bytes,
                  static_cast<std::int64_t>(total) >= kProgressMinBytes);
  out.write(size_le, 8);
  out.write(header.data(), header.size());
  std::uint64_t done = 0;
  constexpr std::size_t kChunk = std::size_t(1) << 26;
  for (std::size_t i : order) {
    const auto& t = tensors[i];
    const std::size_t nb = t.expected_nbytes();
    for (std::size_t o = 0; o < nb; o += kChunk) {
      const std::size_t m = std::min(kChunk, nb - o);
      out.write(t.bytes() + o, m);
      done += m;
      bar.update(static_cast<std::int64_t>(done));
    }
  }
  out.commit();
  bar.finish();
}

}  // namespace kmoe::io
