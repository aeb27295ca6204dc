// Sharded HDF5 checkpoints: the writer (one file per rank + manifest, atomic directory commit) and the reader
// (index of pieces over all rank files, row-range reads for any rank count). Format: docs/checkpoint-format.md.
#include <fcntl.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cerrno>
#include <cstring>
#include <exception>
#include <kmoe/config.hpp>
#include <kmoe/core/bf16.hpp>
#include <kmoe/io/hdf5_checkpoint.hpp>
#include <numeric>
#include <random>
#include <array>
#include <system_error>

#include "hdf5_detail.hpp"
#if KMOE_ENABLE_MPI
#include <mpi.h>
#endif

namespace kmoe::io {

using detail::H5Handle;
namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "kmoe-hdf5-checkpoint";
constexpr const char* kManifestFormat = "kmoe-hdf5-checkpoint-manifest";
// Version 2: save ids in the manifest and each rank file, a digest of everything the manifest stores, '%'-encoded
// dataset names.
constexpr std::int64_t kFormatVersion = 2;
constexpr const char* kManifestName = "manifest.h5";
// Chunks of at most this many bytes: checksummed (Fletcher32) and read independently.
constexpr std::int64_t kChunkBytes = std::int64_t(16) << 20;

// ---- dtypes --------------------------------------------------------------------------------------------------

struct DtypeInfo {
  DType dtype;
  const char* name;
  std::size_t size;
  hid_t (*mem)();   // native memory type
  hid_t (*file)();  // little-endian file type
};

// Functions rather than values: the H5T_* macros are only valid after H5open.
const DtypeInfo kDtypes[] = {
    {DType::BF16, "BF16", 2, [] { return H5T_NATIVE_UINT16; }, [] { return H5T_STD_U16LE; }},
    {DType::F16, "F16", 2, [] { return H5T_NATIVE_UINT16; }, [] { return H5T_STD_U16LE; }},
    {DType::F32, "F32", 4, [] { return H5T_NATIVE_FLOAT; }, [] { return H5T_IEEE_F32LE; }},
    {DType::F64, "F64", 8, [] { return H5T_NATIVE_DOUBLE; }, [] { return H5T_IEEE_F64LE; }},
    {DType::I8, "I8", 1, [] { return H5T_NATIVE_INT8; }, [] { return H5T_STD_I8LE; }},
    {DType::I16, "I16", 2, [] { return H5T_NATIVE_INT16; }, [] { return H5T_STD_I16LE; }},
    {DType::I32, "I32", 4, [] { return H5T_NATIVE_INT32; }, [] { return H5T_STD_I32LE; }},
    {DType::I64, "I64", 8, [] { return H5T_NATIVE_INT64; }, [] { return H5T_STD_I64LE; }},
    {DType::U8, "U8", 1, [] { return H5T_NATIVE_UINT8; }, [] { return H5T_STD_U8LE; }},
    {DType::U16, "U16", 2, [] { return H5T_NATIVE_UINT16; }, [] { return H5T_STD_U16LE; }},
    {DType::U32, "U32", 4, [] { return H5T_NATIVE_UINT32; }, [] { return H5T_STD_U32LE; }},
    {DType::U64, "U64", 8, [] { return H5T_NATIVE_UINT64; }, [] { return H5T_STD_U64LE; }},
    {DType::BOOL, "BOOL", 1, [] { return H5T_NATIVE_UINT8; }, [] { return H5T_STD_U8LE; }},
    {DType::F8_E4M3, "F8_E4M3", 1, [] { return H5T_NATIVE_UINT8; }, [] { return H5T_STD_U8LE; }},
    {DType::F8_E5M2, "F8_E5M2", 1, [] { return H5T_NATIVE_UINT8; }, [] { return H5T_STD_U8LE; }},
};

// Parses the `dtype` attribute of a stored dataset.
const DtypeInfo& dtype_by_name(const std::string& name, const std::string& where) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d;
  throw InputError(where + ": unsupported dtype '" + name + "'");
}

const DtypeInfo& dtype_info(DType dtype, const std::string& where) {
  for (const auto& d : kDtypes)
    if (d.dtype == dtype) return d;
  throw InputError(where + ": dtype #" + std::to_string(int(dtype)) +
                   " cannot be stored in an HDF5 checkpoint (packed or complex types are not supported)");
}

std::int64_t product(const std::vector<std::int64_t>& v, std::size_t from = 0) {
  std::int64_t p = 1;
  for (std::size_t i = from; i < v.size(); ++i) p *= v[i];
  return p;
}

std::string shape_string(const std::vector<std::int64_t>& s) { return kmoe::detail::dims_text(s); }

/// Product of the dimensions times `element`, or -1 when a dimension is negative or the product passes 2^62.
std::int64_t checked_bytes(const std::vector<std::int64_t>& dims, std::size_t from, std::int64_t element) {
  constexpr std::int64_t kMax = std::int64_t(1) << 62;
  std::int64_t p = element;
  for (std::size_t i = from; i < dims.size(); ++i) {
    if (dims[i] < 0 || (dims[i] != 0 && p > kMax / dims[i])) return -1;
    p *= dims[i];
  }
  return p;
}

// ---- names, ids, digests ---------------------------------------------------------------------------------------

/// A tensor name as an HDF5 link name: '%' as %25, '/' as %2F, a name "." as %2E (HDF5 names cannot hold '/' or be
/// "."), so any safetensors name is stored.
std::string encode_name(const std::string& name) {
  if (name == ".") return "%2E";
  std::string out;
  for (const char c : name) {
    if (c == '%')
      out += "%25";
    else if (c == '/')
      out += "%2F";
    else
      out += c;
  }
  return out;
}

/// The inverse of encode_name; InputError for an escape encode_name does not write.
std::string decode_name(const std::string& stored, const std::string& where) {
  std::string out;
  for (std::size_t i = 0; i < stored.size(); ++i) {
    if (stored[i] != '%') {
      out += stored[i];
      continue;
    }
    const std::string esc = stored.substr(i + 1, 2);
    KMOE_CHECK_INPUT(esc == "25" || esc == "2F" || (esc == "2E" && stored == "%2E"), where, ": bad dataset name '",
                     kmoe::detail::printable(stored), "'");
    out += esc == "25" ? '%' : esc == "2F" ? '/' : '.';
    i += 2;
  }
  return out;
}

/// 128 random bits in hex: the id of one rank file of one save.
std::string new_file_id() {
  std::random_device rd;
  static const char* hex = "0123456789abcdef";
  std::string id;
  for (int i = 0; i < 4; ++i) {
    std::uint32_t v = rd();
    for (int k = 0; k < 8; ++k, v >>= 4) id += hex[v & 15];
  }
  return id;
}

/// CRC-32 (IEEE 802.3, as zlib) over a canonical serialisation of what the manifest stores: every value length-
/// prefixed, in a fixed order, so that any changed, added or dropped byte changes the digest.
class Digest {
 public:
  Digest& add(const std::string& s) {
    add(static_cast<std::int64_t>(s.size()));
    bytes(s.data(), s.size());
    return *this;
  }
  Digest& add(std::int64_t v) {
    unsigned char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(v) >> (8 * i));
    bytes(b, 8);
    return *this;
  }
  template <class T>
  Digest& add(const std::vector<T>& v) {
    add(static_cast<std::int64_t>(v.size()));
    for (const auto& x : v) add(x);
    return *this;
  }
  std::int64_t value() const { return static_cast<std::int64_t>(~crc_ & 0xFFFFFFFFu); }

 private:
  void bytes(const void* p, std::size_t n) {
    static const auto table = [] {
      std::array<std::uint32_t, 256> t{};
      for (std::uint32_t i = 0; i < 256; ++i) {
        std::uint32_t c = i;
        for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        t[i] = c;
      }
      return t;
    }();
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) crc_ = table[(crc_ ^ b[i]) & 0xFF] ^ (crc_ >> 8);
  }
  std::uint32_t crc_ = 0xFFFFFFFFu;
};

/// What the manifest records, in one place for the writer and the reader (the digest is computed from it).
struct ManifestContents {
  std::int64_t step = 0, world_size = 0;
  std::string architecture;
  std::vector<std::string> rank_files, rank_file_ids;
  std::vector<std::int64_t> rank_file_sizes, expert_ranges;
  std::map<std::string, std::string> attributes;
  const SourcePlan* source = nullptr;
};

std::int64_t manifest_digest(const ManifestContents& m) {
  Digest d;
  d.add(std::string(kManifestFormat)).add(kFormatVersion).add(m.step).add(m.world_size).add(m.architecture);
  d.add(m.rank_files).add(m.rank_file_ids).add(m.rank_file_sizes).add(m.expert_ranges);
  d.add(static_cast<std::int64_t>(m.attributes.size()));
  for (const auto& [k, v] : m.attributes) d.add(k).add(v);
  const SourcePlan& src = *m.source;
  d.add(static_cast<std::int64_t>(src.tensors.size()));
  for (const auto& t : src.tensors) d.add(t.name).add(t.file).add(t.dtype).add(t.shape);
  d.add(static_cast<std::int64_t>(src.files.size()));
  for (const auto& f : src.files) {
    d.add(f.name).add(f.tensors).add(std::int64_t(f.has_metadata ? 1 : 0));
    d.add(static_cast<std::int64_t>(f.metadata.size()));
    for (const auto& [k, v] : f.metadata) d.add(k).add(v);
  }
  d.add(static_cast<std::int64_t>(src.text_files.size()));
  for (const auto& [k, v] : src.text_files) d.add(k).add(v);
  return d.value();
}

double f16_to_double(std::uint16_t h) {
  const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(double(mant), -24);
  } else if (exp == 31) {
    v = mant ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else {
    v = std::ldexp(double(mant | 0x400), exp - 25);
  }
  return sign ? -v : v;
}

// Converts n elements of `dtype` at src to double.
void to_double(DType dtype, const unsigned char* src, std::size_t n, double* dst, const std::string& where) {
  auto each = [&](auto tag) {
    using T = decltype(tag);
    for (std::size_t i = 0; i < n; ++i) {
      T v;
      std::memcpy(&v, src + i * sizeof(T), sizeof(T));
      dst[i] = static_cast<double>(v);
    }
  };
  auto each16 = [&](auto convert) {
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t b;
      std::memcpy(&b, src + 2 * i, 2);
      dst[i] = convert(b);
    }
  };
  switch (dtype) {
    case DType::BF16: each16([](std::uint16_t b) { return double(bf16::bits_to_float(b)); }); break;
    case DType::F16: each16(f16_to_double); break;
    case DType::F32: each(float{}); break;
    case DType::F64: each(double{}); break;
    case DType::I8: each(std::int8_t{}); break;
    case DType::I16: each(std::int16_t{}); break;
    case DType::I32: each(std::int32_t{}); break;
    case DType::I64: each(std::int64_t{}); break;
    case DType::U8:
    case DType::BOOL: each(std::uint8_t{}); break;
    case DType::U16: each(std::uint16_t{}); break;
    case DType::U32: each(std::uint32_t{}); break;
    case DType::U64: each(std::uint64_t{}); break;
    default: throw InputError(where + ": cannot convert dtype " + dtype_info(dtype, where).name + " to numbers");
  }
}

// ---- small HDF5 helpers (attributes, byte and string-list datasets) ------------------------------------------

void write_string_attr(hid_t obj, const char* name, const std::string& value, const std::string& where) {
  H5Handle type(KMOE_H5(H5Tcopy(H5T_C_S1), where));
  KMOE_H5(H5Tset_size(type, value.size() + 1), where);
  KMOE_H5(H5Tset_strpad(type, H5T_STR_NULLTERM), where);
  H5Handle space(KMOE_H5(H5Screate(H5S_SCALAR), where));
  H5Handle attr(KMOE_H5(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), where + " attribute " + name));
  KMOE_H5(H5Awrite(attr, type, value.c_str()), where + " attribute " + name);
}

void write_int_attrs(hid_t obj, const char* name, const std::vector<std::int64_t>& values, const std::string& where) {
  const hsize_t n = values.size();
  H5Handle space(n == 0 ? KMOE_H5(H5Screate(H5S_NULL), where) : KMOE_H5(H5Screate_simple(1, &n, nullptr), where));
  H5Handle attr(
      KMOE_H5(H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), where + " attribute " + name));
  if (n) KMOE_H5(H5Awrite(attr, H5T_NATIVE_INT64, values.data()), where + " attribute " + name);
}

void write_int_attr(hid_t obj, const char* name, std::int64_t value, const std::string& where) {
  H5Handle space(KMOE_H5(H5Screate(H5S_SCALAR), where));
  H5Handle attr(
      KMOE_H5(H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), where + " attribute " + name));
  KMOE_H5(H5Awrite(attr, H5T_NATIVE_INT64, &value), where + " attribute " + name);
}

void require_attr(hid_t obj, const char* name, const std::string& where) {
  KMOE_CHECK_INPUT(KMOE_H5(H5Aexists(obj, name), where) > 0, where, ": missing attribute '", name,
                   "' (not a kmoe checkpoint file, or damaged)");
}

/// Size in bytes of the file holding `obj`.
std::int64_t file_size_of(hid_t obj, const std::string& where) {
  H5Handle f(KMOE_H5(H5Iget_file_id(obj), where));
  hsize_t size = 0;
  KMOE_H5(H5Fget_filesize(f, &size), where);
  return static_cast<std::int64_t>(size);
}

/// A value of n elements of `element` bytes read from `obj`'s file must fit in that file (no compression is used):
/// a damaged or hostile size never reaches an allocation.
void check_fits_file(hid_t obj, std::int64_t n, std::int64_t element, const std::string& where) {
  const std::int64_t size = file_size_of(obj, where);
  KMOE_CHECK_INPUT(n >= 0 && n <= size / std::max<std::int64_t>(element, 1), where, ": declares ", n, " elements of ",
                   element, " bytes, more than the file's ", size, " bytes hold (damaged?)");
}

std::string read_string_attr(hid_t obj, const char* name, const std::string& where) {
  require_attr(obj, name, where);
  const std::string w = where + " attribute " + name;
  H5Handle attr(KMOE_H5(H5Aopen(obj, name, H5P_DEFAULT), w));
  H5Handle ftype(KMOE_H5(H5Aget_type(attr), w));
  KMOE_CHECK_INPUT(H5Tget_class(ftype) == H5T_STRING && H5Tis_variable_str(ftype) == 0, w,
                   ": expected a fixed-length string");
  const std::size_t size = H5Tget_size(ftype);
  KMOE_CHECK_INPUT(size > 0 && size < (std::size_t(1) << 30), w, ": bad string size ", size);
  check_fits_file(obj, static_cast<std::int64_t>(size), 1, w);
  H5Handle mtype(KMOE_H5(H5Tcopy(H5T_C_S1), w));
  KMOE_H5(H5Tset_size(mtype, size), w);
  KMOE_H5(H5Tset_strpad(mtype, H5T_STR_NULLTERM), w);
  std::string buf(size, '\0');
  KMOE_H5(H5Aread(attr, mtype, buf.data()), w);
  buf.resize(std::strlen(buf.c_str()));
  return buf;
}

std::vector<std::int64_t> read_int_attrs(hid_t obj, const char* name, const std::string& where) {
  require_attr(obj, name, where);
  const std::string w = where + " attribute " + name;
  H5Handle attr(KMOE_H5(H5Aopen(obj, name, H5P_DEFAULT), w));
  H5Handle space(KMOE_H5(H5Aget_space(attr), w));
  const hssize_t n = KMOE_H5(H5Sget_simple_extent_npoints(space), w);
  check_fits_file(obj, n, 8, w);
  std::vector<std::int64_t> v(static_cast<std::size_t>(n));
  H5Handle ftype(KMOE_H5(H5Aget_type(attr), w));
  KMOE_CHECK_INPUT(H5Tget_class(ftype) == H5T_INTEGER, w, ": expected integers");
  if (n > 0) KMOE_H5(H5Aread(attr, H5T_NATIVE_INT64, v.data()), w);
  return v;
}

std::int64_t read_int_attr(hid_t obj, const char* name, const std::string& where) {
  auto v = read_int_attrs(obj, name, where);
  KMOE_CHECK_INPUT(v.size() == 1, where, " attribute ", name, ": expected one integer, got ", v.size());
  return v[0];
}

// Byte datasets hold verbatim files and NUL-separated string lists (names never contain NUL).
void write_bytes(hid_t loc, const std::string& name, const std::string& bytes, const std::string& where) {
  const std::string w = where + " dataset " + name;
  const hsize_t n = bytes.size();
  H5Handle space(KMOE_H5(H5Screate_simple(1, &n, nullptr), w));
  H5Handle dset(KMOE_H5(H5Dcreate2(loc, name.c_str(), H5T_STD_U8LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), w));
  if (n) KMOE_H5(H5Dwrite(dset, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()), w);
}

std::string read_bytes(hid_t loc, const std::string& name, const std::string& where) {
  const std::string w = where + " dataset " + name;
  KMOE_CHECK_INPUT(KMOE_H5(H5Lexists(loc, name.c_str(), H5P_DEFAULT), w) > 0, w, ": missing");
  H5Handle dset(KMOE_H5(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), w));
  H5Handle space(KMOE_H5(H5Dget_space(dset), w));
  const hssize_t n = KMOE_H5(H5Sget_simple_extent_npoints(space), w);
  check_fits_file(loc, n, 1, w);
  std::string bytes(static_cast<std::size_t>(n), '\0');
  if (n) KMOE_H5(H5Dread(dset, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, bytes.data()), w);
  return bytes;
}

void write_strings(hid_t loc, const std::string& name, const std::vector<std::string>& list,
                   const std::string& where) {
  std::string joined;
  for (const auto& s : list) {
    KMOE_CHECK_INPUT(s.find('\0') == std::string::npos, where, ": string '", s, "' contains a NUL byte");
    joined += s;
    joined.push_back('\0');
  }
  write_bytes(loc, name, joined, where);
}

std::vector<std::string> read_strings(hid_t loc, const std::string& name, const std::string& where) {
  const std::string bytes = read_bytes(loc, name, where);
  KMOE_CHECK_INPUT(bytes.empty() || bytes.back() == '\0', where, " dataset ", name, ": unterminated string list");
  std::vector<std::string> out;
  for (std::size_t pos = 0; pos < bytes.size();) {
    const std::size_t end = bytes.find('\0', pos);
    out.push_back(bytes.substr(pos, end - pos));
    pos = end + 1;
  }
  return out;
}

void write_ints(hid_t loc, const std::string& name, const std::vector<std::int64_t>& v, const std::string& where) {
  const std::string w = where + " dataset " + name;
  const hsize_t n = v.size();
  H5Handle space(KMOE_H5(H5Screate_simple(1, &n, nullptr), w));
  H5Handle dset(KMOE_H5(H5Dcreate2(loc, name.c_str(), H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), w));
  if (n) KMOE_H5(H5Dwrite(dset, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), w);
}

std::vector<std::int64_t> read_ints(hid_t loc, const std::string& name, const std::string& where) {
  const std::string w = where + " dataset " + name;
  KMOE_CHECK_INPUT(KMOE_H5(H5Lexists(loc, name.c_str(), H5P_DEFAULT), w) > 0, w, ": missing");
  H5Handle dset(KMOE_H5(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), w));
  H5Handle space(KMOE_H5(H5Dget_space(dset), w));
  const hssize_t n = KMOE_H5(H5Sget_simple_extent_npoints(space), w);
  check_fits_file(loc, n, 8, w);
  std::vector<std::int64_t> v(static_cast<std::size_t>(n));
  if (n) KMOE_H5(H5Dread(dset, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), w);
  return v;
}

H5Handle create_group(hid_t loc, const char* name, const std::string& where) {
  return H5Handle(KMOE_H5(H5Gcreate2(loc, name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), where + " group " + name));
}

H5Handle open_group(hid_t loc, const char* name, const std::string& where) {
  KMOE_CHECK_INPUT(KMOE_H5(H5Lexists(loc, name, H5P_DEFAULT), where) > 0, where, ": missing group '", name, "'");
  return H5Handle(KMOE_H5(H5Gopen2(loc, name, H5P_DEFAULT), where + " group " + name));
}

// New files use the 1.10 format: checksummed metadata (superblock v3, v2 object headers), so damage is detected;
// pinned to 1.10 (not "latest") so that files written by a newer HDF5 still read with 1.10.
H5Handle create_file(const fs::path& path) {
  const std::string w = path.string();
  H5Handle fapl(KMOE_H5(H5Pcreate(H5P_FILE_ACCESS), w));
  KMOE_H5(H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110), w);
  return H5Handle(KMOE_H5(H5Fcreate(w.c_str(), H5F_ACC_EXCL, H5P_DEFAULT, fapl), w));
}

/// Refuses to start writing `path` when its file system (or the process's file size limit) cannot take about
/// `estimate` bytes. HDF5 1.10 cannot recover from a write that fails inside H5Fclose (the file id stays, half
/// destroyed, and the library crashes when it shuts down, e.g. at MPI_Finalize), so a save that would fill the disk
/// must fail before HDF5 writes, with a message saying so.
void check_space(const fs::path& path, std::int64_t estimate) {
  struct statvfs vfs {};
  if (::statvfs(path.parent_path().c_str(), &vfs) == 0) {
    const auto avail = static_cast<std::uint64_t>(vfs.f_bavail) * static_cast<std::uint64_t>(vfs.f_frsize);
    KMOE_CHECK_INPUT(static_cast<std::uint64_t>(estimate) <= avail, path.string(), ": not enough disk space (about ",
                     estimate, " bytes needed, ", avail, " available)");
  }
  rlimit limit{};
  if (::getrlimit(RLIMIT_FSIZE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
    KMOE_CHECK_INPUT(static_cast<std::uint64_t>(estimate) <= static_cast<std::uint64_t>(limit.rlim_cur),
                     path.string(), ": the file size limit (ulimit -f: ", limit.rlim_cur,
                     " bytes) is below the about ", estimate, " bytes this file needs");
}

// Generous upper bounds of what HDF5 writes: the data, Fletcher32's 4 bytes per chunk, a few KiB of object header,
// attributes and chunk index per dataset or attribute, and the file's own structures.
constexpr std::int64_t kPerObjectBytes = 8192, kPerFileBytes = 256 << 10;

std::int64_t rank_file_estimate(const CheckpointContents& c) {
  std::int64_t total = kPerFileBytes;
  for (const auto& p : c.tensors) {
    const std::int64_t rows = p.row_end - p.row_begin;
    const std::int64_t row = checked_bytes(p.global_shape, 1, std::max<std::int64_t>(1, dtype_bits(p.dtype) / 8));
    const std::int64_t bytes = row < 0 || (rows > 0 && row > (std::int64_t(1) << 62) / rows) ? 0 : rows * row;
    total += bytes + 4 * (bytes / kChunkBytes + 1) + kPerObjectBytes + 2 * static_cast<std::int64_t>(p.name.size());
  }
  return total;
}

std::int64_t manifest_estimate(const CheckpointContents& c, int size) {
  std::int64_t total = kPerFileBytes + size * (kPerObjectBytes / 8) + 16 * kPerObjectBytes;
  for (const auto& [k, v] : c.attributes) total += kPerObjectBytes + 2 * static_cast<std::int64_t>(k.size() + v.size());
  for (const auto& t : c.source.tensors)
    total += 2 * static_cast<std::int64_t>(t.name.size() + t.file.size() + t.dtype.size() + 8 * t.shape.size() + 16);
  for (const auto& f : c.source.files) {
    total += 2 * static_cast<std::int64_t>(f.name.size() + 16);
    for (const auto& n : f.tensors) total += 2 * static_cast<std::int64_t>(n.size() + 1);
    for (const auto& [k, v] : f.metadata) total += 2 * static_cast<std::int64_t>(k.size() + v.size() + 16);
  }
  for (const auto& [k, v] : c.source.text_files) total += kPerObjectBytes + static_cast<std::int64_t>(v.size());
  return total;
}

H5Handle open_file(const fs::path& path) {
  const std::string w = path.string();
  return H5Handle(KMOE_H5(H5Fopen(w.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), w));
}

std::string rank_file_name(int rank, int size) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "rank-%05d-of-%05d.h5", rank, size);
  return buf;
}

// ---- writer --------------------------------------------------------------------------------------------------

void check_piece(const TensorPiece& p, const std::string& where) {
  KMOE_CHECK_INPUT(!p.name.empty() && p.name.find('\0') == std::string::npos, where, ": bad tensor name '",
                   kmoe::detail::printable(p.name), "' (non-empty, no NUL)");
  dtype_info(p.dtype, where + " tensor " + p.name);
  KMOE_CHECK_INPUT(!p.global_shape.empty(), where, " tensor ", p.name, ": shape must have at least one dimension");
  for (auto d : p.global_shape)
    KMOE_CHECK_INPUT(d >= 0, where, " tensor ", p.name, ": negative dimension in ", shape_string(p.global_shape));
  KMOE_CHECK_INPUT(0 <= p.row_begin && p.row_begin <= p.row_end && p.row_end <= p.global_shape[0], where, " tensor ",
                   p.name, ": rows [", p.row_begin, ",", p.row_end, ") outside ", shape_string(p.global_shape));
  KMOE_CHECK_INPUT(p.data || p.row_end == p.row_begin || product(p.global_shape, 1) == 0, where, " tensor ", p.name,
                   ": null data");
}

void write_piece(hid_t group, const TensorPiece& p, const std::string& file) {
  const std::string w = file + " dataset /tensors/" + p.name;
  const DtypeInfo& dt = dtype_info(p.dtype, w);
  std::vector<hsize_t> dims(p.global_shape.begin(), p.global_shape.end());
  dims[0] = static_cast<hsize_t>(p.row_end - p.row_begin);
  H5Handle space(KMOE_H5(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), w));
  H5Handle dcpl(KMOE_H5(H5Pcreate(H5P_DATASET_CREATE), w));
  const bool empty = std::find(dims.begin(), dims.end(), hsize_t(0)) != dims.end();
  if (!empty) {
    // Chunk over the leading dimensions so that a chunk stays near kChunkBytes; Fletcher32 checksums each chunk,
    // which turns silent corruption of the data into a read error naming the dataset.
    std::vector<hsize_t> chunk(dims);
    std::int64_t bytes = static_cast<std::int64_t>(dt.size);
    for (auto d : dims) bytes *= static_cast<std::int64_t>(d);
    for (std::size_t i = 0; i < chunk.size() && bytes > kChunkBytes; ++i) {
      const std::int64_t inner = bytes / static_cast<std::int64_t>(chunk[i]);
      const std::int64_t keep = std::max<std::int64_t>(1, kChunkBytes / std::max<std::int64_t>(inner, 1));
      chunk[i] = static_cast<hsize_t>(std::min<std::int64_t>(keep, static_cast<std::int64_t>(chunk[i])));
      bytes = inner * static_cast<std::int64_t>(chunk[i]);
    }
    KMOE_H5(H5Pset_chunk(dcpl, static_cast<int>(chunk.size()), chunk.data()), w);
    KMOE_H5(H5Pset_fletcher32(dcpl), w);
  }
  H5Handle dset(
      KMOE_H5(H5Dcreate2(group, encode_name(p.name).c_str(), dt.file(), space, H5P_DEFAULT, dcpl, H5P_DEFAULT), w));
  write_string_attr(dset, "dtype", dt.name, w);
  write_int_attrs(dset, "global_shape", p.global_shape, w);
  write_int_attr(dset, "row_begin", p.row_begin, w);
  write_int_attr(dset, "row_end", p.row_end, w);
  if (!empty) KMOE_H5(H5Dwrite(dset, dt.mem(), H5S_ALL, H5S_ALL, H5P_DEFAULT, p.data), w);
}

void write_rank_file(const fs::path& path, const CheckpointContents& c, int rank, int size,
                     const std::function<void(const std::string&)>& stage) {
  const std::string w = path.string();
  check_space(path, rank_file_estimate(c));
  H5Handle file = create_file(path);
  write_string_attr(file, "format", kFormat, w);
  write_int_attr(file, "format_version", kFormatVersion, w);
  write_int_attr(file, "rank", rank, w);
  write_int_attr(file, "world_size", size, w);
  write_int_attr(file, "step", c.step, w);
  write_string_attr(file, "file_id", new_file_id(), w);
  H5Handle tensors = create_group(file, "tensors", w);
  std::vector<std::string> seen;
  for (const auto& p : c.tensors) {
    check_piece(p, w);
    seen.push_back(p.name);
    write_piece(tensors, p, w);
    stage("tensor-written");
  }
  std::sort(seen.begin(), seen.end());
  const auto dup = std::adjacent_find(seen.begin(), seen.end());
  KMOE_CHECK_INPUT(dup == seen.end(), w, ": tensor '", kmoe::detail::printable(*dup), "' given twice by rank ", rank);
  tensors.reset();
  file.close_file_checked(w);
  detail::fsync_path(path, false);
}

void write_source(hid_t file, const SourcePlan& src, const std::string& w) {
  H5Handle g = create_group(file, "source", w);
  std::vector<std::string> names, files, dtypes;
  std::vector<std::int64_t> ndims, dims;
  for (const auto& t : src.tensors) {
    names.push_back(t.name);
    files.push_back(t.file);
    dtypes.push_back(t.dtype);
    ndims.push_back(static_cast<std::int64_t>(t.shape.size()));
    dims.insert(dims.end(), t.shape.begin(), t.shape.end());
  }
  write_strings(g, "tensor_names", names, w);
  write_strings(g, "tensor_files", files, w);
  write_strings(g, "tensor_dtypes", dtypes, w);
  write_ints(g, "tensor_ndims", ndims, w);
  write_ints(g, "tensor_dims", dims, w);
  std::vector<std::string> file_names, order, meta_keys, meta_values;
  std::vector<std::int64_t> counts, meta_file, has_meta;
  for (std::size_t i = 0; i < src.files.size(); ++i) {
    const auto& f = src.files[i];
    file_names.push_back(f.name);
    has_meta.push_back(f.has_metadata ? 1 : 0);
    counts.push_back(static_cast<std::int64_t>(f.tensors.size()));
    order.insert(order.end(), f.tensors.begin(), f.tensors.end());
    for (const auto& [k, v] : f.metadata) {
      meta_file.push_back(static_cast<std::int64_t>(i));
      meta_keys.push_back(k);
      meta_values.push_back(v);
    }
  }
  write_strings(g, "file_names", file_names, w);
  write_ints(g, "file_tensor_counts", counts, w);
  write_ints(g, "file_has_metadata", has_meta, w);
  write_strings(g, "file_tensor_order", order, w);
  write_ints(g, "metadata_file", meta_file, w);
  write_strings(g, "metadata_keys", meta_keys, w);
  write_strings(g, "metadata_values", meta_values, w);
  H5Handle text = create_group(g, "text_files", w);
  for (const auto& [name, bytes] : src.text_files) {
    KMOE_CHECK_INPUT(!name.empty() && name.find('/') == std::string::npos, w, ": bad text file name '", name, "'");
    write_bytes(text, name, bytes, w + " source/text_files");
  }
}

SourcePlan read_source(hid_t file, const std::string& w) {
  SourcePlan src;
  H5Handle g = open_group(file, "source", w);
  const auto names = read_strings(g, "tensor_names", w), files = read_strings(g, "tensor_files", w),
             dtypes = read_strings(g, "tensor_dtypes", w);
  const auto ndims = read_ints(g, "tensor_ndims", w), dims = read_ints(g, "tensor_dims", w);
  KMOE_CHECK_INPUT(files.size() == names.size() && dtypes.size() == names.size() && ndims.size() == names.size(), w,
                   ": source tensor lists differ in length");
  std::size_t at = 0;
  for (std::size_t i = 0; i < names.size(); ++i) {
    KMOE_CHECK_INPUT(ndims[i] >= 0 && at + static_cast<std::size_t>(ndims[i]) <= dims.size(), w,
                     ": source tensor shapes inconsistent at ", names[i]);
    SourceTensor t{names[i], files[i], dtypes[i],
                   std::vector<std::int64_t>(dims.begin() + static_cast<std::ptrdiff_t>(at),
                                             dims.begin() + static_cast<std::ptrdiff_t>(at + ndims[i]))};
    at += static_cast<std::size_t>(ndims[i]);
    src.tensors.push_back(std::move(t));
  }
  const auto file_names = read_strings(g, "file_names", w), order = read_strings(g, "file_tensor_order", w),
             keys = read_strings(g, "metadata_keys", w), values = read_strings(g, "metadata_values", w);
  const auto counts = read_ints(g, "file_tensor_counts", w), meta_file = read_ints(g, "metadata_file", w),
             has_meta = read_ints(g, "file_has_metadata", w);
  KMOE_CHECK_INPUT(counts.size() == file_names.size() && has_meta.size() == file_names.size() &&
                       keys.size() == values.size() && meta_file.size() == keys.size(),
                   w, ": source file lists differ in length");
  at = 0;
  for (std::size_t i = 0; i < file_names.size(); ++i) {
    KMOE_CHECK_INPUT(counts[i] >= 0 && at + static_cast<std::size_t>(counts[i]) <= order.size(), w,
                     ": source file tensor counts inconsistent at ", file_names[i]);
    SourceFile f;
    f.name = file_names[i];
    f.has_metadata = has_meta[i] != 0;
    f.tensors.assign(order.begin() + static_cast<std::ptrdiff_t>(at),
                     order.begin() + static_cast<std::ptrdiff_t>(at + counts[i]));
    at += static_cast<std::size_t>(counts[i]);
    src.files.push_back(std::move(f));
  }
  for (std::size_t i = 0; i < keys.size(); ++i) {
    KMOE_CHECK_INPUT(meta_file[i] >= 0 && static_cast<std::size_t>(meta_file[i]) < src.files.size(), w,
                     ": source metadata names file ", meta_file[i]);
    src.files[static_cast<std::size_t>(meta_file[i])].metadata[keys[i]] = values[i];
  }
  H5Handle text = open_group(g, "text_files", w);
  std::vector<std::string> text_names;
  auto collect = [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
    static_cast<std::vector<std::string>*>(data)->push_back(name);
    return 0;
  };
  KMOE_H5(H5Literate(text, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &text_names), w + " source/text_files");
  for (const auto& n : text_names) src.text_files[n] = read_bytes(text, n, w + " source/text_files");
  return src;
}

void write_manifest(const fs::path& tmp_dir, const CheckpointContents& c, int size) {
  const fs::path path = tmp_dir / kManifestName;
  const std::string w = path.string();
  ManifestContents m;
  m.step = c.step;
  m.world_size = size;
  m.architecture = c.architecture;
  m.attributes = c.attributes;
  m.source = &c.source;
  for (int r = 0; r < size; ++r) {
    m.rank_files.push_back(rank_file_name(r, size));
    const fs::path rank_path = tmp_dir / m.rank_files.back();
    m.rank_file_sizes.push_back(static_cast<std::int64_t>(fs::file_size(rank_path)));
    H5Handle rank_file = open_file(rank_path);
    m.rank_file_ids.push_back(read_string_attr(rank_file, "file_id", rank_path.string()));
  }
  for (const auto& [b, e] : c.expert_ranges) {
    m.expert_ranges.push_back(b);
    m.expert_ranges.push_back(e);
  }
  check_space(path, manifest_estimate(c, size));
  H5Handle file = create_file(path);
  write_string_attr(file, "format", kManifestFormat, w);
  write_int_attr(file, "format_version", kFormatVersion, w);
  write_int_attr(file, "world_size", size, w);
  write_int_attr(file, "step", c.step, w);
  write_string_attr(file, "architecture", c.architecture, w);
  write_int_attr(file, "digest", manifest_digest(m), w);
  write_strings(file, "rank_files", m.rank_files, w);
  write_strings(file, "rank_file_ids", m.rank_file_ids, w);
  write_ints(file, "rank_file_sizes", m.rank_file_sizes, w);
  write_ints(file, "expert_ranges", m.expert_ranges, w);
  H5Handle attrs = create_group(file, "attributes", w);
  for (const auto& [k, v] : c.attributes) write_string_attr(attrs, k.c_str(), v, w + " group attributes");
  attrs.reset();
  write_source(file, c.source, w);
  file.close_file_checked(w);
  detail::fsync_path(path, false);
}

}  // namespace

// ---- public: save --------------------------------------------------------------------------------------------

RankGroup world_rank_group() {
  RankGroup g;
#if KMOE_ENABLE_MPI
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) {
    MPI_Comm_rank(MPI_COMM_WORLD, &g.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g.size);
    g.all_ok = [](bool ok) {
      int mine = ok ? 1 : 0, all = 0;
      const int rc = MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
      if (rc != MPI_SUCCESS) throw InternalError("MPI_Allreduce failed in a checkpoint save");
      return all != 0;
    };
  }
#endif
  return g;
}

void save_hdf5_checkpoint(const fs::path& dir_in, const CheckpointContents& contents, const RankGroup& group,
                          const SaveOptions& options) {
  detail::hdf5_silence();
  auto stage = [&](const std::string& s) {
    if (options.on_stage) options.on_stage(s);
  };
  const fs::path dir = fs::absolute(dir_in).lexically_normal();
  const fs::path tmp = detail::sibling_temp_dir(dir);

  // Each phase ends in all_ok: a failure anywhere makes every rank throw (the local error where there is one).
  std::exception_ptr error;
  auto phase = [&](bool active, const std::function<void()>& body) {
    bool ok = true;
    if (active) {
      try {
        body();
      } catch (...) {
        error = std::current_exception();
        ok = false;
      }
    }
    if (!group.all_ok(ok)) {
      if (error) std::rethrow_exception(error);
      throw InputError("saving checkpoint " + dir.string() + " failed on another rank");
    }
  };

  phase(group.rank == 0, [&] {
    KMOE_CHECK_INPUT(contents.expert_ranges.empty() || contents.expert_ranges.size() == std::size_t(group.size),
                     "checkpoint ", dir.string(), ": ", contents.expert_ranges.size(), " expert ranges for ",
                     group.size, " ranks");
    detail::prepare_temp_dir(tmp);
    stage("prepared");
  });
  phase(true, [&] {
    write_rank_file(tmp / rank_file_name(group.rank, group.size), contents, group.rank, group.size, stage);
    stage("rank-file-written");
  });
  phase(group.rank == 0, [&] {
    write_manifest(tmp, contents, group.size);
    stage("manifest-written");
    detail::commit_directory(tmp, dir, stage);
  });
}

// ---- public: load --------------------------------------------------------------------------------------------

namespace {
struct Piece {
  int file = 0;  // index into Impl::files
  std::int64_t row_begin = 0, row_end = 0;
};
struct StoredTensor {
  StoredTensorInfo info;
  std::vector<Piece> pieces;  // sorted by row_begin, tiling [0, shape[0])
};
}  // namespace

struct Hdf5Checkpoint::Impl {
  fs::path dir;
  std::int64_t step = 0;
  int world_size = 0;
  std::string architecture;
  std::vector<std::pair<std::int64_t, std::int64_t>> expert_ranges;
  std::map<std::string, std::string> attributes;
  SourcePlan source;
  std::vector<fs::path> file_paths;
  std::vector<H5Handle> files;
  std::map<std::string, StoredTensor> tensors;
};

Hdf5Checkpoint::Hdf5Checkpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Hdf5Checkpoint::Hdf5Checkpoint(Hdf5Checkpoint&&) noexcept = default;
Hdf5Checkpoint& Hdf5Checkpoint::operator=(Hdf5Checkpoint&&) noexcept = default;
Hdf5Checkpoint::~Hdf5Checkpoint() = default;

bool is_hdf5_checkpoint(const fs::path& dir) {
  detail::hdf5_silence();
  const fs::path m = dir / kManifestName;
  std::error_code ec;
  if (!fs::is_regular_file(m, ec)) return false;
#if H5_VERSION_GE(1, 12, 0)
  const htri_t is = H5Fis_accessible(m.c_str(), H5P_DEFAULT);
#else
  const htri_t is = H5Fis_hdf5(m.c_str());
#endif
  H5Eclear2(H5E_DEFAULT);
  return is > 0;
}

Hdf5Checkpoint Hdf5Checkpoint::open(const fs::path& dir) {
  detail::hdf5_silence();
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  std::error_code ec;
  KMOE_CHECK_INPUT(fs::is_directory(dir, ec), "checkpoint ", dir.string(), ": not a directory");
  const fs::path mpath = dir / kManifestName;
  KMOE_CHECK_INPUT(fs::is_regular_file(mpath, ec), "checkpoint ", dir.string(), ": no ", kManifestName,
                   " (not a kmoe checkpoint, or an incomplete save)");
  const std::string mw = mpath.string();
  std::vector<std::string> rank_files, rank_ids;
  std::vector<std::int64_t> rank_sizes;
  {
    H5Handle m = open_file(mpath);
    KMOE_CHECK_INPUT(read_string_attr(m, "format", mw) == kManifestFormat, mw, ": not a kmoe checkpoint manifest");
    const auto version = read_int_attr(m, "format_version", mw);
    KMOE_CHECK_INPUT(version == kFormatVersion, mw, ": format version ", version, " (this kmoe reads version ",
                     kFormatVersion, ")");
    impl->step = read_int_attr(m, "step", mw);
    const auto ws = read_int_attr(m, "world_size", mw);
    KMOE_CHECK_INPUT(ws >= 1 && ws < (1 << 24), mw, ": bad world_size ", ws);
    impl->world_size = static_cast<int>(ws);
    impl->architecture = read_string_attr(m, "architecture", mw);
    const std::int64_t digest = read_int_attr(m, "digest", mw);
    rank_files = read_strings(m, "rank_files", mw);
    rank_ids = read_strings(m, "rank_file_ids", mw);
    rank_sizes = read_ints(m, "rank_file_sizes", mw);
    KMOE_CHECK_INPUT(rank_files.size() == static_cast<std::size_t>(ws) && rank_sizes.size() == rank_files.size() &&
                         rank_ids.size() == rank_files.size(),
                     mw, ": lists ", rank_files.size(), " rank files for world size ", ws);
    const auto ranges = read_ints(m, "expert_ranges", mw);
    KMOE_CHECK_INPUT(ranges.size() % 2 == 0, mw, ": odd expert_ranges length");
    for (std::size_t i = 0; i < ranges.size(); i += 2) impl->expert_ranges.emplace_back(ranges[i], ranges[i + 1]);
    H5Handle attrs = open_group(m, "attributes", mw);
    std::vector<std::string> keys;
    auto collect = [](hid_t, const char* name, const H5A_info_t*, void* data) -> herr_t {
      static_cast<std::vector<std::string>*>(data)->push_back(name);
      return 0;
    };
    KMOE_H5(H5Aiterate2(attrs, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &keys), mw + " group attributes");
    for (const auto& k : keys) impl->attributes[k] = read_string_attr(attrs, k.c_str(), mw + " group attributes");
    impl->source = read_source(m, mw);
    ManifestContents mc;
    mc.step = impl->step;
    mc.world_size = ws;
    mc.architecture = impl->architecture;
    mc.rank_files = rank_files;
    mc.rank_file_ids = rank_ids;
    mc.rank_file_sizes = rank_sizes;
    mc.expert_ranges = ranges;
    mc.attributes = impl->attributes;
    mc.source = &impl->source;
    KMOE_CHECK_INPUT(manifest_digest(mc) == digest, mw,
                     ": its contents do not match their digest (the manifest is damaged)");
  }

  for (int r = 0; r < impl->world_size; ++r) {
    const fs::path p = dir / rank_files[static_cast<std::size_t>(r)];
    const std::string w = p.string();
    KMOE_CHECK_INPUT(rank_files[r] == rank_file_name(r, impl->world_size), mw, ": unexpected rank file name '",
                     rank_files[r], "'");
    KMOE_CHECK_INPUT(fs::is_regular_file(p, ec), "checkpoint ", dir.string(), ": missing shard ", rank_files[r],
                     " (saved by ", impl->world_size, " ranks)");
    const auto actual = static_cast<std::int64_t>(fs::file_size(p));
    KMOE_CHECK_INPUT(actual == rank_sizes[r], w, ": ", actual, " bytes, the manifest records ", rank_sizes[r],
                     " (truncated or replaced)");
    H5Handle f = open_file(p);
    KMOE_CHECK_INPUT(read_string_attr(f, "format", w) == kFormat, w, ": not a kmoe checkpoint rank file");
    KMOE_CHECK_INPUT(read_int_attr(f, "rank", w) == r && read_int_attr(f, "world_size", w) == impl->world_size &&
                         read_int_attr(f, "step", w) == impl->step,
                     w, ": rank/world_size/step do not match the manifest (a shard of another checkpoint?)");
    KMOE_CHECK_INPUT(read_string_attr(f, "file_id", w) == rank_ids[static_cast<std::size_t>(r)], w,
                     ": saved by another save than the manifest's (its file_id differs): a rank file of another run "
                     "or of an earlier save of this checkpoint");
    H5Handle g = open_group(f, "tensors", w);
    std::vector<std::string> names;
    auto collect = [](hid_t, const char* name, const H5L_info_t*, void* data) -> herr_t {
      static_cast<std::vector<std::string>*>(data)->push_back(name);
      return 0;
    };
    KMOE_H5(H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect, &names), w + " group tensors");
    for (const auto& stored : names) {
      const std::string dw = w + " dataset /tensors/" + stored;
      const std::string n = decode_name(stored, dw);
      H5Handle d(KMOE_H5(H5Dopen2(g, stored.c_str(), H5P_DEFAULT), dw));
      const DtypeInfo& dt = dtype_by_name(read_string_attr(d, "dtype", dw), dw);
      StoredTensorInfo info{n, dt.dtype, read_int_attrs(d, "global_shape", dw)};
      Piece piece{r, read_int_attr(d, "row_begin", dw), read_int_attr(d, "row_end", dw)};
      KMOE_CHECK_INPUT(!info.shape.empty() && 0 <= piece.row_begin && piece.row_begin <= piece.row_end &&
                           piece.row_end <= info.shape[0],
                       dw, ": rows [", piece.row_begin, ",", piece.row_end, ") outside ", shape_string(info.shape));
      H5Handle space(KMOE_H5(H5Dget_space(d), dw));
      H5Handle ftype(KMOE_H5(H5Dget_type(d), dw));
      KMOE_CHECK_INPUT(H5Tget_size(ftype) == dt.size, dw, ": element size ", H5Tget_size(ftype), " for dtype ",
                       dt.name);
      const int nd = KMOE_H5(H5Sget_simple_extent_ndims(space), dw);
      std::vector<hsize_t> dims(static_cast<std::size_t>(std::max(nd, 0)));
      KMOE_H5(H5Sget_simple_extent_dims(space, dims.data(), nullptr), dw);
      std::vector<std::int64_t> expect(info.shape);
      expect[0] = piece.row_end - piece.row_begin;
      KMOE_CHECK_INPUT(std::vector<std::int64_t>(dims.begin(), dims.end()) == expect, dw, ": dataset shape ",
                       shape_string(std::vector<std::int64_t>(dims.begin(), dims.end())), ", attributes say ",
                       shape_string(expect));
      // The piece's bytes are in this file (checksummed chunks, no compression): a shape no file could hold is
      // damage, refused before any read allocates for it.
      const std::int64_t row_bytes = checked_bytes(info.shape, 1, static_cast<std::int64_t>(dt.size));
      KMOE_CHECK_INPUT(row_bytes >= 0 && (expect[0] == 0 || row_bytes <= rank_sizes[static_cast<std::size_t>(r)] /
                                                                              expect[0]),
                       dw, ": ", shape_string(expect), " of ", dt.name, " is more than the file's ",
                       rank_sizes[static_cast<std::size_t>(r)], " bytes hold (damaged?)");
      auto [it, inserted] = impl->tensors.try_emplace(n, StoredTensor{info, {}});
      KMOE_CHECK_INPUT(inserted || (it->second.info.dtype == info.dtype && it->second.info.shape == info.shape), dw,
                       ": ", dt.name, shape_string(info.shape), " disagrees with another rank's ",
                       dtype_info(it->second.info.dtype, dw).name, shape_string(it->second.info.shape));
      it->second.pieces.push_back(piece);
    }
    impl->file_paths.push_back(p);
    impl->files.push_back(std::move(f));
  }
  for (auto& [n, t] : impl->tensors) {
    std::sort(t.pieces.begin(), t.pieces.end(),
              [](const Piece& a, const Piece& b) { return a.row_begin < b.row_begin; });
    std::int64_t next = 0;
    for (const auto& p : t.pieces) {
      if (p.row_begin == p.row_end) continue;
      KMOE_CHECK_INPUT(p.row_begin == next, "checkpoint ", dir.string(), ": tensor ", n, " rows [", next, ",",
                       p.row_begin, ") are ", p.row_begin > next ? "missing" : "stored twice");
      next = p.row_end;
    }
    KMOE_CHECK_INPUT(next == t.info.shape[0], "checkpoint ", dir.string(), ": tensor ", n, " rows [", next, ",",
                     t.info.shape[0], ") are missing");
  }
  return Hdf5Checkpoint(std::move(impl));
}

const fs::path& Hdf5Checkpoint::dir() const { return impl_->dir; }
std::int64_t Hdf5Checkpoint::step() const { return impl_->step; }
int Hdf5Checkpoint::saved_world_size() const { return impl_->world_size; }
const std::string& Hdf5Checkpoint::architecture() const { return impl_->architecture; }
const std::vector<std::pair<std::int64_t, std::int64_t>>& Hdf5Checkpoint::expert_ranges() const {
  return impl_->expert_ranges;
}
const std::map<std::string, std::string>& Hdf5Checkpoint::attributes() const { return impl_->attributes; }
const SourcePlan& Hdf5Checkpoint::source() const { return impl_->source; }
bool Hdf5Checkpoint::has(const std::string& name) const { return impl_->tensors.count(name) != 0; }

std::vector<std::string> Hdf5Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& kv : impl_->tensors) out.push_back(kv.first);
  return out;
}

const StoredTensorInfo& Hdf5Checkpoint::info(const std::string& name) const {
  auto it = impl_->tensors.find(name);
  KMOE_CHECK_INPUT(it != impl_->tensors.end(), "checkpoint ", impl_->dir.string(), ": no tensor '", name, "'");
  return it->second.info;
}

void Hdf5Checkpoint::read_rows(const std::string& name, std::int64_t row_begin, std::int64_t row_end, void* out,
                               std::size_t nbytes) const {
  detail::hdf5_silence();
  const StoredTensorInfo& ti = info(name);
  const StoredTensor& t = impl_->tensors.at(name);
  const DtypeInfo& dt = dtype_info(ti.dtype, name);
  const std::int64_t row_bytes = product(ti.shape, 1) * static_cast<std::int64_t>(dt.size);
  KMOE_CHECK_INPUT(0 <= row_begin && row_begin <= row_end && row_end <= ti.shape[0], "checkpoint ",
                   impl_->dir.string(), ": tensor ", name, " rows [", row_begin, ",", row_end, ") outside ",
                   shape_string(ti.shape));
  KMOE_CHECK_INPUT(static_cast<std::int64_t>(nbytes) == (row_end - row_begin) * row_bytes, "checkpoint ",
                   impl_->dir.string(), ": tensor ", name, " rows [", row_begin, ",", row_end, ") are ",
                   (row_end - row_begin) * row_bytes, " bytes, buffer holds ", nbytes);
  auto* dst = static_cast<unsigned char*>(out);
  for (const auto& p : t.pieces) {
    const std::int64_t lo = std::max(row_begin, p.row_begin), hi = std::min(row_end, p.row_end);
    if (lo >= hi || row_bytes == 0) continue;
    const std::string w = impl_->file_paths[static_cast<std::size_t>(p.file)].string() + " dataset /tensors/" + name;
    H5Handle d(KMOE_H5(H5Dopen2(impl_->files[static_cast<std::size_t>(p.file)], ("tensors/" + encode_name(name)).c_str(),
                                H5P_DEFAULT),
                       w));
    H5Handle fspace(KMOE_H5(H5Dget_space(d), w));
    std::vector<hsize_t> start(ti.shape.size(), 0), count(ti.shape.begin(), ti.shape.end());
    start[0] = static_cast<hsize_t>(lo - p.row_begin);
    count[0] = static_cast<hsize_t>(hi - lo);
    KMOE_H5(H5Sselect_hyperslab(fspace, H5S_SELECT_SET, start.data(), nullptr, count.data(), nullptr), w);
    H5Handle mspace(KMOE_H5(H5Screate_simple(static_cast<int>(count.size()), count.data(), nullptr), w));
    KMOE_H5(H5Dread(d, dt.mem(), mspace, fspace, H5P_DEFAULT, dst + (lo - row_begin) * row_bytes), w);
  }
}

std::vector<unsigned char> Hdf5Checkpoint::read(const std::string& name) const {
  const StoredTensorInfo& ti = info(name);
  const std::int64_t n = product(ti.shape) * static_cast<std::int64_t>(dtype_info(ti.dtype, name).size);
  std::vector<unsigned char> bytes(static_cast<std::size_t>(n));
  read_rows(name, 0, ti.shape[0], bytes.data(), bytes.size());
  return bytes;
}

std::vector<double> Hdf5Checkpoint::read_rows_f64(const std::string& name, std::int64_t row_begin,
                                                  std::int64_t row_end) const {
  const StoredTensorInfo& ti = info(name);
  const DtypeInfo& dt = dtype_info(ti.dtype, name);
  const std::int64_t n = std::max<std::int64_t>(row_end - row_begin, 0) * product(ti.shape, 1);
  std::vector<unsigned char> bytes(static_cast<std::size_t>(n) * dt.size);
  read_rows(name, row_begin, row_end, bytes.data(), bytes.size());
  std::vector<double> out(static_cast<std::size_t>(n));
  to_double(ti.dtype, bytes.data(), out.size(), out.data(), "checkpoint " + impl_->dir.string() + ": tensor " + name);
  return out;
}

std::vector<float> Hdf5Checkpoint::read_rows_f32(const std::string& name, std::int64_t row_begin,
                                                 std::int64_t row_end) const {
  const auto d = read_rows_f64(name, row_begin, row_end);
  return std::vector<float>(d.begin(), d.end());
}

fs::path latest_checkpoint(const fs::path& run_dir) {
  std::error_code ec;
  fs::path best;
  std::int64_t best_step = -1;
  if (!fs::is_directory(run_dir, ec)) return best;
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.rfind("checkpoint-", 0) != 0) continue;
    const std::string digits = n.substr(11);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 18) continue;
    const std::int64_t k = std::stoll(digits);
    if (k > best_step && is_hdf5_checkpoint(e.path())) {
      best_step = k;
      best = e.path();
    }
  }
  return best;
}

std::vector<std::pair<std::int64_t, std::int64_t>> contiguous_expert_ranges(std::int64_t num_experts, int ranks) {
  KMOE_CHECK_USAGE(ranks >= 1 && num_experts >= 0, "contiguous_expert_ranges: ", num_experts, " experts over ", ranks,
                   " ranks");
  std::vector<std::pair<std::int64_t, std::int64_t>> r;
  const std::int64_t base = num_experts / ranks, extra = num_experts % ranks;
  std::int64_t b = 0;
  for (int i = 0; i < ranks; ++i) {
    const std::int64_t e = b + base + (i < extra ? 1 : 0);
    r.emplace_back(b, e);
    b = e;
  }
  return r;
}

}  // namespace kmoe::io
